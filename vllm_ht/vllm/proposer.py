"""HTProposer: the `custom_class` drafter vLLM builds; it owns the tree policy.

vLLM hands custom proposers token ids only, so drafting happens in the HT model runner, which
has the pseudo rows; it asks this object which tree to use and turns pseudo logits into the
flattened draft list. Called through vLLM's stock `propose()` (i.e. without the HT worker), it
refuses with the fix.
"""
from __future__ import annotations

import torch

from ..tree import DEFAULT_ACCURACY, TokenTree, likely_end_nodes, template_for_budget
from .options import HTOptions


class HTProposer:
    def __init__(self, vllm_config):
        self.options = HTOptions.from_vllm_config(vllm_config)
        self.ht_config = None
        self._trees: dict[int, TokenTree] = {}
        self._anchors: dict[TokenTree, list[int]] = {}

    def load_model(self, model) -> None:
        self.ht_config = getattr(model, "ht_config", None)
        if self.ht_config is None:
            raise RuntimeError("the Hidden Transfer proposer needs the HT model class: start vLLM with "
                               "--speculative-model hidden_transfer (or hf_overrides architectures="
                               "['HTLlamaForCausalLM']).")

    def propose(self, *args, **kwargs):
        raise RuntimeError("HTProposer drafts inside the HT model runner: start vLLM with "
                           "--speculative-model hidden_transfer (or --worker-cls vllm_ht.vllm.worker.HTCPUWorker "
                           "/ HTGPUWorker).")

    def tree(self, num_nodes: int) -> TokenTree:
        if num_nodes not in self._trees:
            cfg = self.ht_config
            self._trees[num_nodes] = template_for_budget(cfg.tree_templates, cfg.topr_accuracy, num_nodes,
                                                         cfg.num_steps)
        return self._trees[num_nodes]

    def anchor_nodes(self, tree: TokenTree) -> list[int]:
        """Nodes of `tree` that get pseudo rows (all, unless options.pseudo_nodes caps them)."""
        if tree not in self._anchors:
            count = self.options.pseudo_nodes or tree.num_nodes
            accuracy = self.ht_config.topr_accuracy or DEFAULT_ACCURACY[: self.ht_config.num_steps]
            self._anchors[tree] = likely_end_nodes(tree, accuracy, count)
        return self._anchors[tree]

    def tree_for_batch(self, batch_size: int) -> TokenTree:
        return self.tree(self.options.nodes_for_batch(batch_size))

    @staticmethod
    def drafts(tree: TokenTree, root_token: int, pseudo_logits: torch.Tensor) -> list[int]:
        """pseudo_logits [k, V] of the accepted node -> draft tokens of tree nodes 1..N (BFS)."""
        ranks = max((p[-1] for p in tree.paths), default=0) + 1
        top = torch.topk(pseudo_logits.float(), ranks, dim=-1).indices
        return tree.node_tokens(root_token, top)[1:].tolist()
