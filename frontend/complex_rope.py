"""Placeholder: LowerComplexToReal is being written."""
from ..passes.infra import Pass, PassResult


class LowerComplexToReal(Pass):
    def call(self, graph):
        return PassResult(graph, False)
