"""A module that registers nothing."""

VALUE = 1
