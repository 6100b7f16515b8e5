"""Request and response bodies; their fields mirror the Python API (`Recommender.recommend` and friends).

Types are strict (an id is a string or an integer, `k` an integer, never "10" or 10.0), so a wrong type is
a 422 naming the field; values (k <= 0, unknown ids, repeated candidates) are checked by the recommender
itself, so HTTP and Python callers get the same llmrec message.
"""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

ItemId = Union[StrictStr, StrictInt]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored


class _Options(_Body):
    k: StrictInt = Field(10, description="How many items to return (at most the recommender's max_k).")
    exclude: Optional[list[ItemId]] = Field(None, description="Items never to return.")
    filter: Optional[list[ItemId]] = Field(None, description="Return only these items (a list of allowed ids).")
    exclude_history: Optional[StrictBool] = Field(
        None, description="Leave out items of the history; null = as the model was trained (true by default)."
    )
    new_items: StrictInt = Field(0, description="Hold up to this many of the k slots for the best items added after "
                                 "training (no trained ID embedding); they come back with \"reserved\": true.")
    diversity: Optional[StrictFloat] = Field(
        None, description="MMR re-ranking in the item-text space, from 0 (null, the default: the plain ranking) to 1 "
        "(only unlikeness to the items already picked); each item keeps its relevance score."
    )


class RecommendRequest(_Options):
    history: list[ItemId] = Field(..., description="Item ids the user interacted with, oldest first; [] = a cold user.")
    profile: Optional[StrictStr] = Field(None, description="Free-text user profile (models trained with use_user_profiles).")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"history": ["50", "172", "133"], "k": 5}]})


class RecommendBatchRequest(_Options):
    histories: list[list[ItemId]] = Field(..., description="One history per user, each oldest first.")
    profiles: Optional[list[Optional[StrictStr]]] = Field(None, description="One profile text (or null) per history.")


class RerankRequest(_Body):
    history: list[ItemId] = Field(..., description="Item ids of the history, oldest first.")
    candidates: list[ItemId] = Field(..., description="Item ids to score, each once.")


class ExplainRequest(_Body):
    history: list[ItemId] = Field(..., description="Item ids of the history, oldest first (not empty).")
    item_id: ItemId = Field(..., description="The item whose reranking score to explain.")
    per_head: StrictBool = Field(False, description="One weight per attention head instead of their mean.")


class NewItem(_Body):
    item_id: ItemId
    text: StrictStr = Field(..., description="The item's text (title, description...), embedded by the model's BERT.")


class AddItemsRequest(_Body):
    items: list[NewItem] = Field(..., description="Items to add; recommendable as soon as the call returns.")


class ReloadRequest(_Body):
    path: Optional[StrictStr] = Field(None, description="Model folder or Hub repo id to serve (default: the one served now).")


class SaveRequest(_Body):
    path: Optional[StrictStr] = Field(None, description="Folder to save into (default: the folder served now).")


class ScoredItem(BaseModel):
    item_id: str
    score: float
    reserved: Optional[bool] = Field(None, description="Only with new_items > 0: whether a slot held for new items holds it.")


class RecommendResponse(BaseModel):
    items: list[ScoredItem]


class RecommendBatchResponse(BaseModel):
    results: list[list[ScoredItem]]


class ItemWeight(BaseModel):
    item_id: str
    weight: Union[float, list[float]]


class ExplainResponse(BaseModel):
    weights: list[ItemWeight]


class CatalogueResponse(BaseModel):
    num_items: int
    added: int = 0


class ModelResponse(BaseModel):
    path: Optional[str]
    num_items: int


class ErrorResponse(BaseModel):
    error: str = Field(..., description="The llmrec error class (InvalidRequestError, UnknownItemError, ...).")
    detail: str = Field(..., description="What is wrong and how to fix it.")
