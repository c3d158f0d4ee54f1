"""A program module that registers a program under a built-in module's name."""

PROGRAMS = {"ChainOfThought": lambda: None}
