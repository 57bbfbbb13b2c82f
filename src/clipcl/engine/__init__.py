"""The engine: one trainer for every stream, the runtime, the run."""
