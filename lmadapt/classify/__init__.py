"""The classifier path: MNIST, continual learning (permuted MNIST), incremental classes and
the Hebbian class curriculum.

One network builder (models), one training loop whose plugins add EWC, MbPA's memory writes
and the Hebbian softmax (loop, plugins), the four predictors (predict); each experiment is
its data and its list of plugins.  The memory and MbPA math are the language-model path's
(lmadapt.memory, lmadapt.adapt), and so are the MbPA settings (lmadapt.methods.mbpa.MbPAParams).
"""
