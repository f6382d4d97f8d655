"""Dynamo's graph breaks in the report: counted per backend, summarized, never another run's."""

import torch

import lecompile
from lecompile.graph_breaks import summary


class TwoBlocks(torch.nn.Module):
    def __init__(self, broken: bool):
        super().__init__()
        self.first, self.second, self.broken = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), broken

    def forward(self, x):
        x = torch.relu(self.first(x))
        if self.broken:
            torch._dynamo.graph_break()
        return self.second(x).sum()


def _breaks(report):
    return [n for n in report.notes if "graph break" in n]


def test_a_break_is_reported_with_dynamos_reason():
    x = torch.randn(4, 8, requires_grad=True)
    report = lecompile.explain(TwoBlocks(broken=True), x)
    [note] = _breaks(report)
    assert report.graphs == 2 and "Dynamo broke the forward at 1 graph break(s)" in note
    assert "Call to `torch._dynamo.graph_break()` (User-inserted graph break. Message: None) x1" in note


def test_breaks_of_other_compilations_are_not_counted():
    torch.compile(TwoBlocks(broken=True), backend="eager")(torch.randn(4, 8))
    backend = lecompile.LongExposureBackend(inductor=False)
    torch.compile(TwoBlocks(broken=False), backend=backend)(torch.randn(4, 8, requires_grad=True))
    torch._dynamo.reset()
    torch.compile(TwoBlocks(broken=True), backend="eager")(torch.randn(4, 8))  # after the backend's graph
    assert backend.report.graphs == 1 and not _breaks(backend.report)


def test_summary_keeps_the_kind_and_explanation_on_one_line():
    message = ("Unsupported method call\n  Explanation: Dynamo does not know how to trace method `__delattr__`\n"
               "  Hint: Avoid calling it.\n\n  Developer debug context: call_method ...")
    assert summary(message) == "Unsupported method call (Dynamo does not know how to trace method `__delattr__`)"
    assert summary("x" * 300).endswith("...") and len(summary("x" * 300)) == 240
