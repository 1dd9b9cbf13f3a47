"""moe-emergence: upcycle a pretrained GPT-2 into a Mixture-of-Experts model and watch experts specialise.

Importing the package registers ``gpt2_moe`` with ``AutoConfig`` and ``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from moe_emergence.config import MoEConfig
from moe_emergence.layer import MoEWrapper
from moe_emergence.modeling import GPT2MoEConfig, GPT2MoEForCausalLM, MoECausalLMOutput
from moe_emergence.routing import Router, RouterOutput
from moe_emergence.upcycle import upcycle

__version__ = "0.1.0"

AutoConfig.register(GPT2MoEConfig.model_type, GPT2MoEConfig, exist_ok=True)
AutoModelForCausalLM.register(GPT2MoEConfig, GPT2MoEForCausalLM, exist_ok=True)

__all__ = [
    "GPT2MoEConfig",
    "GPT2MoEForCausalLM",
    "MoECausalLMOutput",
    "MoEConfig",
    "MoEWrapper",
    "Router",
    "RouterOutput",
    "upcycle",
]
