"""RewardModel: a transformers decoder backbone plus a value head, trained with the fused pairwise loss.

The backbone is whatever ``AutoModel`` loads; a ``*ForSequenceClassification`` checkpoint with one label
keeps its score head as the value head. Rewards are read at each sequence's last token, whose flat row
index the collator computes from sequence lengths — never by searching for pad ids."""

import contextlib
from typing import Optional

import torch
from torch import nn

from .loss import PairwiseRewardOutput, pairwise_reward_loss
from .nn import RewardHead

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _score_linear(seq_model):
    """The one-output Linear of a *ForSequenceClassification model (score / classifier / v_head)."""
    for name in ("score", "classifier", "v_head", "value_head"):
        layer = getattr(seq_model, name, None)
        if isinstance(layer, nn.Linear) and layer.out_features == 1:
            return layer
    return None


class RewardModel(nn.Module):
    """backbone: a transformers base model (hidden states out); head: RewardHead(hidden_size)."""

    def __init__(self, backbone: nn.Module, head: RewardHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def from_pretrained(cls, name_or_path, dtype="fp32", head_bias=False, attn_implementation="auto",
                        trust_remote_code=False):
        """Load a backbone (local folder or hub id) and its value head. A sequence-classification checkpoint
        with num_labels == 1 (an rmfast export, say) keeps its score head; anything else gets a new head."""
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        torch_dtype = DTYPES[dtype]
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation and attn_implementation != "auto":  # auto: transformers' best supported one
            kwargs["attn_implementation"] = attn_implementation
        archs = getattr(config, "architectures", None) or []
        if any(a.endswith("ForSequenceClassification") for a in archs) and getattr(config, "num_labels", 0) == 1:
            seq = AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
            score = _score_linear(seq)
            if score is None:
                raise ValueError(f"{name_or_path}: a sequence-classification checkpoint without a one-output score head")
            head = RewardHead(score.in_features, bias=score.bias is not None, dtype=torch_dtype)
            with torch.no_grad(), _gathered([score.weight, score.bias]):
                head.weight.copy_(score.weight.reshape(-1))
                if score.bias is not None:
                    head.bias.copy_(score.bias.reshape(1))
            return cls(seq.base_model, head)
        backbone = AutoModel.from_pretrained(name_or_path, **kwargs)
        hidden = _hidden_size(backbone.config)
        return cls(backbone, RewardHead(hidden, bias=head_bias, dtype=torch_dtype))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, **backbone_kwargs):
        """input_ids [R, L] → last hidden states [R, L, D]. attention_mask: [R, L] padding mask, or a 4-D
        mask of a packed layout (None with segment attention, whose blocks come in backbone_kwargs)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False, **backbone_kwargs)
        return out.last_hidden_state

    def forward(self, input_ids, attention_mask, chosen_index, rejected_index, position_ids=None,
                margin: Optional[torch.Tensor] = None, center_coef=0.0, backend="auto",
                **backbone_kwargs) -> PairwiseRewardOutput:
        """One forward for all chosen and rejected rows; chosen_index / rejected_index: [P] flat row
        indices into R·L. Returns the fused loss and both rewards."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, **backbone_kwargs)
        return pairwise_reward_loss(hidden, self.head.weight, chosen_index, rejected_index, bias=self.head.bias,
                                    margin=margin, center_coef=center_coef, backend=backend)

    @torch.no_grad()
    def score(self, input_ids, attention_mask, last_index):
        """Rewards [R] (float32) of sequences whose last tokens sit at flat indices last_index [R]."""
        hidden = self.hidden_states(input_ids, attention_mask)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, last_index)
        return self.head.rewards(rows)


def _gathered(params):
    """A context in which ZeRO-3-partitioned parameters hold their full data (nothing to do for others)."""
    params = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def _hidden_size(config):
    for name in ("hidden_size", "n_embd", "d_model"):
        if hasattr(config, name):
            return getattr(config, name)
    raise ValueError(f"cannot tell the hidden size of a {type(config).__name__}")
