"""The one training engine (engine.py) and the stages that plug into it (stages/)."""
