"""A task that counts the calls which compute gradients' model outputs (shared by tests)."""
from trak_fast.features.tasks import ClassificationTask


class CountingTask(ClassificationTask):
    """Counts calls that compute gradients' model outputs (any gradient path calls one)."""

    def __init__(self):
        self.gradient_calls = 0

    def output(self, model, example):
        self.gradient_calls += 1
        return super().output(model, example)

    def outputs(self, model, batch):
        self.gradient_calls += 1
        return super().outputs(model, batch)

    def outputs_and_out_to_loss(self, model, batch):
        self.gradient_calls += 1
        return super().outputs_and_out_to_loss(model, batch)
