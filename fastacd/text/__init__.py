"""Text: CD of LSTM classifiers (``TextDecomposer``, the drop-in ``cd_text``), the 1-D
agglomeration (``agg_1d``), its tiles (``tiling_1d``), text hierarchy plots and the toy
sentiment task (``sentiment_toy``)."""
from .lstm import (Batch, Sentence, TextCDResult, TextDecomposer, all_phrases,  # noqa: F401
                   cd_text, cd_text_phrases, check_phrase, check_phrases, phrase_masks,
                   plot_text_hierarchy, text_hierarchy, text_hierarchy_json, tokens_of)
