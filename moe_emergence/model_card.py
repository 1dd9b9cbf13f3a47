"""The README.md (Hugging Face model card) that ``GPT2MoEForCausalLM.save_pretrained`` writes beside the
weights, so a saved folder says how to load it.

transformers has no hook that lets a saved folder name the package behind its model type without
``trust_remote_code`` (an ``auto_map`` entry makes transformers ask for that flag, which this project never
uses: the folder holds no code). So the card says it: without ``import moe_emergence``,
``AutoModelForCausalLM`` reports the ``gpt2_moe`` model type as unknown ("your version of Transformers is
out of date", which it is not), and ``GPT2LMHeadModel.from_pretrained`` loads a dense GPT-2 whose MoE blocks
have random MLPs.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

CARD_NAME = "README.md"


def card_text(model_type: str, moe_layers: list[int], num_experts: int, top_k: int) -> str:
    """The model card of a saved GPT-2 MoE folder (YAML metadata, then markdown)."""
    data = ModelCardData(library_name="moe-emergence", tags=["mixture-of-experts", "gpt2", "moe-emergence"])
    return f"""---
{data.to_yaml()}
---

# GPT-2 mixture of experts (moe-emergence)

A `GPT2MoEForCausalLM` (model type `{model_type}`): GPT-2 whose MLPs in blocks {moe_layers} are
mixtures of {num_experts} experts (top-{top_k} routing), made with the `moe-emergence` package.

**Load it with the package imported** (it registers `{model_type}` with transformers' Auto classes):

```python
import moe_emergence  # noqa: F401
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
```

Without `import moe_emergence`, `AutoModelForCausalLM` stops with "model type `{model_type}` ... your
version of Transformers is out of date" (it is not: the type comes from this package), and
`GPT2LMHeadModel.from_pretrained` loads a *dense* GPT-2 whose MLPs in blocks {moe_layers} are random (its
load report lists the experts as UNEXPECTED and the MLP weights as MISSING). This folder holds no code:
never pass `trust_remote_code`.
"""


def card_for(config) -> str:
    """``card_text`` of a ``GPT2MoEConfig``."""
    return card_text(config.model_type, config.moe_layers, config.moe.num_experts, config.moe.top_k)


_CARD_FACTS = re.compile(
    r"A `GPT2MoEForCausalLM` \(model type `(?P<model_type>[^`]+)`\): GPT-2 whose MLPs in blocks "
    r"(?P<layers>\[[0-9, ]*\]) are\nmixtures of (?P<experts>\d+) experts \(top-(?P<top_k>\d+) routing\)"
)


def is_unedited_card(text: str) -> bool:
    """Whether ``text`` is a card ``card_text`` wrote, for any model, with no edit (such a card is rewritten
    by the next save; anything else in README.md is the user's and kept)."""
    m = _CARD_FACTS.search(text)
    if m is None:
        return False
    layers = [int(v) for v in re.findall(r"\d+", m["layers"])]
    card = card_text(m["model_type"], layers, int(m["experts"]), int(m["top_k"]))
    return text == ModelCard(card).content


def write_model_card(folder: str | Path, config) -> None:
    """Write ``README.md`` (``card_for(config)``) into ``folder``, unless a README that is not an unedited
    card of this module is there (a card the user wrote or edited is kept)."""
    path = Path(folder) / CARD_NAME
    if path.exists() and not is_unedited_card(path.read_text(encoding="utf-8", errors="replace")):
        return
    ModelCard(card_for(config)).save(path)
