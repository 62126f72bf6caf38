"""GPU tests: run on the device machine with `pytest tests/gpu --confcutdir tests/gpu`. Each test module
skips itself without CUDA (`pytestmark`); a collection hook here would reach every test of the session."""
