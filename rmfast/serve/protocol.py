"""Requests and responses of rmfast-serve's routes, as pydantic models (FastAPI validates with them and draws
the OpenAPI page from them). Unknown fields are accepted and ignored, as vLLM and OpenRLHF clients send
fields of their own."""

import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

Message = dict[str, Any]  # {"role", "content"}: checked by rmfast.data.formats as for training rows


class Request(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- OpenRLHF's remote reward model: --remote_rm_url http://HOST:PORT/get_reward ----

class GetRewardRequest(Request):
    query: list[str] = Field(min_length=1, description="whole texts, prompt + response, as the policy rendered them")
    prompts: Optional[list[str]] = Field(
        None, description="the prompt of each query: queries with the same prompt are scored as one group, the "
                          "prompt computed once; each must be a prefix of its query")
    labels: Optional[list[Any]] = Field(None, description="accepted and ignored (a reward model needs none)")


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = Field(
        description="per query: `truncated` (1.0 where the length policy cut it), `tokens` (its token count)")


# ---- vLLM's classify protocol (verl's reward loop, SGLang's /v1/classify) ----

class ClassifyRequest(Request):
    model: Optional[str] = None
    input: Optional[Union[str, list[str]]] = Field(None, description="one text or a list of texts")
    messages: Optional[list[Message]] = Field(None, description="one conversation, rendered by the chat template")
    use_activation: Optional[bool] = Field(None, description="sigmoid of the reward (default); false: the raw reward")
    activation: Optional[bool] = Field(None, description="older name of use_activation")
    softmax: Optional[bool] = Field(None, description="older name of use_activation")
    add_special_tokens: Optional[bool] = Field(
        None, description="input texts: true (default) adds the tokenizer's special tokens and EOS, as rmfast-score "
                          "scores a `text` row; false reads the text as rendered (a chat template's output): EOS "
                          "after it only where the export says so")
    truncate_prompt_tokens: Optional[int] = Field(
        None, description="as vLLM: keep only each input's last k tokens (after the training length policy); -1: "
                          "no limit but max_length")
    user: Optional[str] = None


class ClassificationData(BaseModel):
    index: int
    label: Optional[str]
    probs: list[float]
    num_classes: int
    truncated: bool = Field(description="whether the length policy cut this text (rmfast's addition)")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: Optional[dict] = None


class ListResponse(BaseModel):
    """The envelope vLLM's list responses use: an id, "list", when, which model, and the token usage."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage


class ClassificationResponse(ListResponse):
    id: str = Field(default_factory=lambda: f"classify-{uuid.uuid4().hex}")
    data: list[ClassificationData]


# ---- rmfast's group route ----

class Group(Request):
    prompt: Optional[Union[str, list[Message]]] = Field(
        None, description="the prompt: a string, or a list of messages (then each response is a list of messages)")
    messages: Optional[list[Message]] = Field(None, description="the prompt as messages (another name for it)")
    responses: list[Union[str, list[Message]]] = Field(min_length=1)


class RewardsRequest(Group):
    """One group (prompt, messages, responses at the top level) or several under `groups`."""

    responses: Optional[list[Union[str, list[Message]]]] = None
    groups: Optional[list[Group]] = Field(None, min_length=1)
    model: Optional[str] = None


class GroupRewards(BaseModel):
    index: int
    rewards: list[float] = Field(description="one per response, in the order given")
    best: int = Field(description="the index of the response with the highest reward")
    truncated: bool = Field(description="whether the length policy cut the group")
    attributes: Optional[dict[str, list[float]]] = Field(
        default=None, description="an attribute head's (num_labels = A): each attribute's value per response")


class RewardsResponse(ListResponse):
    id: str = Field(default_factory=lambda: f"rewards-{uuid.uuid4().hex}")
    data: list[GroupRewards]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = Field(description="the field at fault, e.g. query[3]")
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
