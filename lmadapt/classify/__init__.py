"""The classifier path: MNIST, continual learning (permuted MNIST) and incremental classes.

Uses the same EpisodicMemory and MbPA core (lmadapt.memory, lmadapt.adapt) as the
language-model path.
"""
