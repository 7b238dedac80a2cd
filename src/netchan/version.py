"""netchan's version (the package's ``__version__``, and ``netchan --version``)."""

VERSION = "0.1.0"
