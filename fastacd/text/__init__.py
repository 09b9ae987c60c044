"""Text: CD of LSTM and GRU classifiers (``TextDecomposer``, ``GRUDecomposer``), of any other
classifier through the general engine (``ModelTextDecomposer``: transformers), the drop-in
``cd_text``, the 1-D agglomeration (``agg_1d``), its tiles (``tiling_1d``), text hierarchy
plots and the toy sentiment task (``sentiment_toy``)."""
from ..capture.phrases import (Batch, all_phrases, check_phrase, check_phrases,  # noqa: F401
                               phrase_masks, tokens_of)
from .dropin import cd_text, cd_text_phrases  # noqa: F401
from .lstm import Sentence, TextCDResult, TextDecomposer  # noqa: F401
from .general import ModelSentence, ModelTextDecomposer  # noqa: F401
from .gru import GRUDecomposer  # noqa: F401
from .plots import plot_text_hierarchy, text_hierarchy, text_hierarchy_json  # noqa: F401
