"""The genprog model zoo (installed as ``genprog.models``): classic and deep generative models
whose operations override genprog's generic, inference-backed ones with exact forms."""

__all__: list[str] = []
