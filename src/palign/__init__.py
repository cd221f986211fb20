"""palign: personality alignment of large language models on PAPI."""

__version__ = "0.1.0"
