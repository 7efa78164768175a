"""netprobe: test and diagnose TCP, UDP and Unix-socket networking. No I/O at import."""

__all__ = ["__version__"]

__version__ = "0.1.0"
