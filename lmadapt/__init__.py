"""lmadapt: dynamic test-time adaptation of LSTM language models."""

__version__ = "0.1.0"
