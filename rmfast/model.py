"""RewardModel: a transformers decoder backbone plus a value head, trained with the fused pairwise loss.

The backbone is whatever ``AutoModel`` loads; a ``*ForSequenceClassification`` checkpoint with one label
keeps its score head as the value head. Rewards are read at each sequence's last token, whose flat row
index the layout computes from sequence lengths — never by searching for pad ids."""

import contextlib

import torch
from torch import nn

from .loss import PairwiseRewardOutput
from .objective import log_nu_of, reward_loss
from .nn import AttributeHead, RewardHead
from .errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _score_linear(seq_model, outputs=1):
    """The `outputs`-output Linear of a *ForSequenceClassification model (score / classifier / v_head)."""
    for name in ("score", "classifier", "v_head", "value_head"):
        layer = getattr(seq_model, name, None)
        if isinstance(layer, nn.Linear) and layer.out_features == outputs:
            return layer
    return None


class RewardModel(nn.Module):
    """backbone: a transformers base model (hidden states out); head: RewardHead(hidden_size)."""

    def __init__(self, backbone: nn.Module, head: RewardHead):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.attention = "dense"  # how packed batches are attended (set_attention)
        self._native_attention = None  # the backbone's own attention, restored for dense
        self.tie_log_nu = None  # Davidson's log ν (the davidson objective): add_tie_parameter

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def from_pretrained(cls, name_or_path, dtype="fp32", head_bias=False, attn_implementation="auto",
                        trust_remote_code=False, revision=None):
        """Load a backbone (local folder or hub id) and its value head. A sequence-classification checkpoint
        with num_labels == 1 (an rmfast export, say) keeps its score head; anything else gets a new head."""
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        torch_dtype = DTYPES[dtype]
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
        kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, "revision": revision}
        if attn_implementation and attn_implementation != "auto":  # auto: transformers' best supported one
            kwargs["attn_implementation"] = attn_implementation
        archs = getattr(config, "architectures", None) or []
        combination = getattr(config, "rmfast_attribute_weights", None)  # an rmfast attribute head's export
        labels = getattr(config, "num_labels", 0)
        if any(a.endswith("ForSequenceClassification") for a in archs) and (labels == 1 or combination):
            seq = AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
            score = _score_linear(seq, labels)
            if score is None:
                raise UserError(f"{name_or_path}: a sequence-classification checkpoint without a {labels}-output "
                                f"score head")
            bias = score.bias is not None
            head = AttributeHead(score.in_features, labels, combination, bias=bias, dtype=torch_dtype) \
                if combination else RewardHead(score.in_features, bias=bias, dtype=torch_dtype)
            with torch.no_grad(), _gathered([score.weight, score.bias]):
                head.weight.copy_(score.weight.reshape(head.weight.shape))
                if score.bias is not None:
                    head.bias.copy_(score.bias.reshape(head.bias.shape))
            return cls(seq.base_model, head)
        backbone = AutoModel.from_pretrained(name_or_path, **kwargs)
        hidden = _hidden_size(backbone.config)
        return cls(backbone, RewardHead(hidden, bias=head_bias, dtype=torch_dtype))

    def set_attention(self, kind):
        """Run packed batches with attention `kind`: dense, segments, flex or varlen (rmfast.attention). The
        backbone is switched to rmfast's implementation for segments / flex / varlen and back to its own for
        dense. Padded batches (no blocks) need the backbone's own attention with their 2-D mask: dense."""
        from .attention import IMPLEMENTATIONS, register

        if self._native_attention is None:
            self._native_attention = getattr(self.backbone.config, "_attn_implementation", None) or "eager"
        if kind in IMPLEMENTATIONS:
            register()
            self.backbone.set_attn_implementation(IMPLEMENTATIONS[kind])
        else:
            self.backbone.set_attn_implementation(self._native_attention)
        self.attention = kind

    def backbone_inputs(self, batch):
        """The attention inputs of the backbone for `batch`: its mask (2-D padding mask, 4-D dense mask or
        None), position_ids, and the block structure the attention needs (blocks, BlockMask or varlen plan).
        A batch prepared ahead (`prepare`) carries them already."""
        if batch.inputs is not None:
            return batch.inputs
        return self.prepare(batch).inputs

    def prepare(self, batch):
        """`batch` with its backbone inputs built (on batch's device): what a background worker does
        while the previous micro-batch computes."""
        from .attention import model_inputs

        eager = getattr(self.backbone.config, "_attn_implementation", "") == "eager"
        dtype = next(self.backbone.parameters()).dtype
        batch.inputs = model_inputs(batch, self.attention, dtype=dtype, eager=eager)
        return batch

    def hidden_states(self, batch):
        """Last hidden states [R, L, D] of a Batch (any layout) in one backbone forward."""
        out = self.backbone(input_ids=batch.input_ids, use_cache=False, **self.backbone_inputs(batch))
        return out.last_hidden_state

    def use_attribute_head(self, num_attributes, combination=None):
        """Replace the value head with an AttributeHead of num_attributes outputs (the regression objectives),
        on the value head's device and dtype, with its bias setting; an AttributeHead of that size is kept."""
        old = self.head
        if isinstance(old, AttributeHead) and old.num_attributes == num_attributes:
            if combination is not None:
                old.combination = torch.as_tensor(combination, dtype=torch.float32).reshape(-1)
            return old
        self.head = AttributeHead(old.hidden_size, num_attributes, combination, bias=old.bias is not None,
                                  device=old.weight.device, dtype=old.weight.dtype)
        return self.head

    def add_tie_parameter(self, nu=1.0, learn=True):
        """Davidson's tie parameter as log ν, a parameter of the model (trained with it when `learn`; saved in
        checkpoints, and in an export's config as rmfast_tie_nu)."""
        device, dtype = self.head.weight.device, torch.float32
        # [1], not a 0-d tensor: DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as
        self.tie_log_nu = nn.Parameter(torch.tensor([log_nu_of(nu)], device=device, dtype=dtype), requires_grad=learn)
        return self.tie_log_nu

    def forward(self, batch, center_coef=0.0, backend="auto", check_indices=None, rewards_at=None,
                objective="bradley_terry", attributes_at=None) -> PairwiseRewardOutput:
        """The fused loss and both rewards of a Batch (rmfast.layouts): one forward for all its rows, the
        objective (rmfast.objective) over every comparison, read at batch.chosen_index / rejected_index ([C]
        flat row indices into R·L). rewards_at: [n] flat rows → just their rewards [n] float32 (evaluation
        through the DeepSpeed engine, so that ZeRO-3 gathers the weights); attributes_at: the same for an
        attribute head's [n, A] attributes. check_indices: the op's own range
        check (pairwise_reward_loss); the layouts build valid indices, so the trainer passes False."""
        hidden = self.hidden_states(batch)
        if rewards_at is not None:
            return self.head.rewards(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rewards_at))
        if attributes_at is not None:
            return self.head.attributes(hidden.reshape(-1, hidden.shape[-1]).index_select(0, attributes_at))
        log_nu = self.tie_log_nu if self.tie_log_nu is not None else 0.0
        weight, bias, attribute_head = self.head.weight, self.head.bias, None
        if isinstance(self.head, AttributeHead):
            weight, bias = self.head.scalar()
            attribute_head = (self.head.weight, self.head.bias, self.head.combination)
        return reward_loss(hidden, weight, batch, bias=bias, center_coef=center_coef,
                           backend=backend, check_indices=check_indices, objective=objective,
                           log_nu=log_nu.float().reshape(()) if torch.is_tensor(log_nu) else log_nu,
                           attribute_head=attribute_head)

    @torch.no_grad()
    def rewards(self, batch, index):
        """Rewards [n] (float32) of the sequences of a Batch whose last tokens sit at flat indices index [n]."""
        hidden = self.hidden_states(batch)
        return self.head.rewards(hidden.reshape(-1, hidden.shape[-1]).index_select(0, index))


def enable_activation_checkpointing(backbone):
    """Recompute each layer's activations in the backward (non-reentrant, so the layouts' keyword arguments
    reach the recomputation). transformers 5.2x calls it activation_checkpointing_enable and deprecates
    gradient_checkpointing_enable (gone in v6); earlier 5.x releases (5.17, for one) have only the latter."""
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
    raise UserError(f"cannot tell the hidden size of a {type(config).__name__}")
