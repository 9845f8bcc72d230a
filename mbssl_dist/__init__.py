"""mbssl-dist: distributed trainer for MBSSL (Xu et al., SIGIR'23)."""

__version__ = "0.1.0"
