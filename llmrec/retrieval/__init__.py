"""Nearest-neighbour retrieval of items from embeddings."""

from llmrec.retrieval.index import ItemIndex
from llmrec.retrieval.candidates import CandidatePipeline, build_item_index

__all__ = ["CandidatePipeline", "ItemIndex", "build_item_index"]
