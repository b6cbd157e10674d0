"""GPT model (dense and MoE) whose attention / MLP / expert linears come from a factory."""
from .config import PRESETS, ModelConfig, preset
from .gpt import Block, GPTModel
from .losses import lm_loss
from .params import ParamCount, count_params, num_params
from .layers import Attention, RotaryEmbedding, SwiGLU, rms_norm
from .linear_factory import LinearFactory, LinearFactoryProtocol, derive_sr_seed
from .moe import AuxLossScaler, MoE, Router

__all__ = ["PRESETS", "ModelConfig", "preset", "Block", "GPTModel", "ParamCount", "count_params", "num_params",
           "Attention", "RotaryEmbedding", "SwiGLU", "rms_norm", "LinearFactory", "LinearFactoryProtocol",
           "derive_sr_seed", "AuxLossScaler", "MoE", "Router", "lm_loss"]
