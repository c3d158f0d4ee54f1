"""Complete applications served with dspex-trio (each is a package: run them from the repository root)."""
