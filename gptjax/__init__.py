"""gptjax: a JAX/XLA sharded inference engine for GPT models."""

from gptjax.config import EngineConfig, MeshShape, ModelConfig, PRESETS
from gptjax.engine import Engine, GenerationResult
from gptjax.sharding import make_mesh

__all__ = ["Engine", "EngineConfig", "GenerationResult", "MeshShape", "ModelConfig", "PRESETS", "make_mesh"]
__version__ = "0.1.0"
