"""Attribution: the original's score functions (``score_funcs``), baselines beside CD
(``baselines``: gradients, integrated gradients, occlusion, ...) and interactions."""
from .baselines import (Attribution, aggregate, attribute, compare, expected_gradients,  # noqa: F401
                        gradient_x_input, integrated_gradients, path_rule, segment_labels,
                        segment_masks, smoothgrad, tiles)
