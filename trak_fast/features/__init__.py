"""Features: tasks (what is differentiated), per-example gradients (:mod:`.gradients`), their
projection into the feature space (:mod:`.spec`), the featurizer of one batch and the loop over
a loader (:mod:`.loop`)."""
from .featurizer import Featurizer
from .layout import FeatureBlock
from .loop import Features, featurize, target_features
from .model import num_grad_params
from .spec import FeatureSpec
from .tasks import ClassificationTask, LanguageModelingTask, RegressionTask, Task, get_task

__all__ = ["Featurizer", "Features", "FeatureBlock", "FeatureSpec", "featurize", "target_features",
           "num_grad_params", "Task", "ClassificationTask", "RegressionTask",
           "LanguageModelingTask", "get_task"]
