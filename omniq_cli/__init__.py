"""The `omniq` command line."""
