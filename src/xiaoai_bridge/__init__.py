"""xiaoai-bridge: make a XiaoAi speaker answer with any OpenAI-compatible LLM."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xiaoai-bridge")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"
