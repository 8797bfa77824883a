"""shitu: general image recognition by detection, embedding and gallery search."""

__version__ = "0.1.0"
