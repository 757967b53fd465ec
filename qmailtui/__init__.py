"""The qmailtui console and command line."""
