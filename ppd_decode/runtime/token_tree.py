"""Token trees: drafts that share a prefix verified as one block (a tree attention mask, positions = prefix length +
depth), and the longest root path that equals the final layer's argmax chain. Used by the tree strategies and by
self-speculation's several text continuations."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Tree:
    """Nodes in drafting order (that is also their cache column order in layers 1..d); node 0 is the root."""

    tokens: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    prob: list[float] = field(default_factory=list)  # path probability under the draft head

    def add(self, token: int, parent: int, prob: float) -> int:
        self.tokens.append(token)
        self.parent.append(parent)
        self.depth.append(0 if parent < 0 else self.depth[parent] + 1)
        self.prob.append(prob)
        return len(self.tokens) - 1

    def ancestors(self, nodes: list[int]) -> torch.Tensor:
        """bool [len(nodes), len(nodes)]: row i sees column j when nodes[j] is nodes[i] or one of its ancestors."""
        index = {n: i for i, n in enumerate(nodes)}
        see = torch.zeros(len(nodes), len(nodes), dtype=torch.bool)
        for i, n in enumerate(nodes):
            while n >= 0:
                if n in index:
                    see[i, index[n]] = True
                n = self.parent[n]
        return see


def accepted_prefix(drafts: list[int], targets: list[int]) -> int:
    """How many leading drafts equal the final layer's argmax chain (``targets[i]``: its token after draft i-1; the
    chain's analogue of ``accepted_path``)."""
    a = 0
    while a < len(drafts) and a < len(targets) and drafts[a] == targets[a]:
        a += 1
    return a


def accepted_path(tree: Tree, alive: list[int], target: dict[int, int]) -> list[int]:
    """Root-first nodes of the longest path whose tokens equal the final layer's argmax chain: from the root, walk
    down while a surviving child carries the token the final layer chose at its parent (``target[node]``)."""
    path = [0]
    while True:
        nxt = next((c for c in alive if tree.parent[c] == path[-1] and tree.tokens[c] == target[path[-1]]), None)
        if nxt is None:
            return path
        path.append(nxt)


def tree_mask(see: torch.Tensor, rows: list[int], prefix: int, dtype, device) -> torch.Tensor:
    """Additive [1, 1, len(rows), prefix + see.shape[1]] mask: the rows (indices into ``see``) see the whole cached
    prefix and, among the tree columns, what ``see`` says."""
    vis = torch.ones(len(rows), prefix + see.shape[1], dtype=torch.bool)
    vis[:, prefix:] = see[rows]
    mask = torch.zeros(vis.shape, dtype=dtype)
    return mask.masked_fill_(~vis, torch.finfo(dtype).min)[None, None].to(device)
