"""lm-eval task files shipped with lmadapt (found with --include_path lmadapt.harness.TASK_DIR)."""
