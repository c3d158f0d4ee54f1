"""A program module whose PROGRAMS is not a dict."""

PROGRAMS = ["rag"]
