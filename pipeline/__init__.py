"""aurora-pipeline: classify all-sky auroral images and build MLT occurrence statistics."""

__version__ = "0.1.0"
