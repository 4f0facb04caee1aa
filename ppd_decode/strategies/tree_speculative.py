"""Token-tree self-speculation with early pruning and a dynamic tree size (ProPD's ideas, Zhong et al. 2024, on our
early-exit heads). Exact: acceptance only ever uses the final layer's argmax.

One step:
1. **Draft a tree** with layers 1..d and the head for layer d, one level at a time: every node of a level runs
   through layers 1..d as one block (each row sees the cached prefix and its own ancestors: a tree attention mask,
   positions = prefix length + depth), the head proposes each node's top children with their probabilities.
   Static trees expand a fixed number of children per depth (``branching``); dynamic trees add children in order
   of path probability while expected accepted tokens per predicted second still rise (``dynamic``), from a cost
   profile of this machine (lower-stack and verification time by rows).
2. **Verify** all nodes with one pass of layers d+1..L, starting from the layer-d states the draft left (layers
   1..d are never recomputed: their cache already holds every node).
3. **Prune early** (``prune_layer`` p): after layers d+1..p, our head for layer p scores the nodes; a node whose
   token is not among its parent's top ``prune_top`` there is dropped with its subtree, and layers p+1..L run on
   the survivors only (fewer rows, a smaller mask).
4. **Accept** the longest root path whose tokens equal the final layer's argmax chain, plus the final layer's next
   token; only that path's cache entries are kept (moved into place per layer range: pruned layers hold fewer
   columns).

A head that reads f(t-1) gets it for the root's children: the final normed state of the verified row that produced
the root's token (unknown after the prefill); deeper levels follow drafts the final layer has not run yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.functional import linear as nn_linear

from ppd_decode.errors import HeadMismatchError, PPDError
from ppd_decode.models.heads import F_PREV, H_D, check_layer, ranked_size
from ppd_decode.profiling.step_cost import StepCosts, profile_steps
from ppd_decode.runtime.stack import (
    decoder,
    embed,
    final_argmax,
    new_cache,
    num_layers,
    prefill,
    run_layers,
    select_cache,
)
from ppd_decode.runtime.token_tree import Tree, accepted_path, tree_mask
from ppd_decode.runtime.timing import stopwatch
from ppd_decode.strategies.base import DecodingStrategy, Stats, pick_head, register


@dataclass
class TreeSpeculativeConfig:
    layer: int | None = None  # d: the drafting head's layer
    branching: tuple[int, ...] = (2, 2, 1, 1)  # static tree: children per node at each depth (its length = depth)
    max_nodes: int = 16  # drafted nodes per step at most (the root not counted)
    prune_layer: int | None = None  # p (d < p < L, a head must exist for it): prune after layer p; None: no pruning
    prune_top: int = 4  # a node survives if its token is among its parent's top-``prune_top`` at layer p
    prune_shortlist: int = 16  # rank at layer p among the draft's top-this of every node (0: the full vocabulary)
    dynamic: bool = False  # size the tree each step from path probabilities and the cost profile
    max_depth: int = 6  # dynamic trees: deepest level
    max_children: int = 4  # dynamic trees: candidates per node considered


TREE_ROWS = (1, 2, 4, 8, 16, 32)


def profile_tree_costs(model, head, d: int, rows=TREE_ROWS, context: int = 256, repeats: int = 3) -> StepCosts:
    """A drafting level (layers 1..d + the head) and verification (layers d+1..L) by rows, at batch size 1."""
    return profile_steps(model, head, d, batches=(1,), lower_rows=rows, upper_rows=rows, context=context,
                         repeats=repeats)


def updated_calibration(calibration: float, predicted: float, accepted: int) -> float:
    """Dynamic trees' observed / predicted accepted length, learned online. ``predicted``: the drafts' summed path
    probabilities (already calibrated); with no drafts it drifts back slowly, so speculation is tried again."""
    if predicted == 0:
        return min(1.0, calibration * 1.01)
    return min(2.0, max(0.05, 0.9 * calibration + 0.1 * calibration * (accepted + 0.5) / (predicted + 0.5)))


@dataclass
class TreeStats(Stats):
    tree_nodes: list[int] = field(default_factory=list)  # drafted nodes per step
    survivors: list[int] = field(default_factory=list)  # ... left after early pruning
    verify_seconds: list[float] = field(default_factory=list)  # each verification pass (pruning's saving)


@register
class TreeSpeculative(DecodingStrategy):
    name = "tree_speculative"
    Stats = TreeStats
    Config = TreeSpeculativeConfig
    needs_heads = True
    head_inputs = (H_D, F_PREV)  # f(t-1) for the root's children (see above)

    def __init__(self, model, config=None, heads=None, tokenizer=None):
        super().__init__(model, config, heads, tokenizer)
        c = self.config
        self.layer, self.head = pick_head(self, c.layer)
        L = num_layers(model)
        if not c.branching or any(b < 1 for b in c.branching):
            raise PPDError(f"branching must list at least one depth of >= 1 children, got {c.branching}")
        if c.max_nodes < 1 or c.prune_top < 1:
            raise PPDError("max_nodes and prune_top must be >= 1")
        self.prune_head = None
        if c.prune_layer is not None:
            check_layer(model, c.prune_layer)
            if not self.layer < c.prune_layer < L:
                raise HeadMismatchError(f"prune_layer must lie between the drafting layer {self.layer} and {L}, "
                                        f"got {c.prune_layer}")
            if c.prune_layer not in self.heads:
                raise HeadMismatchError(f"no head for prune_layer {c.prune_layer}; heads given: {sorted(self.heads)}")
            self.prune_head = self.heads[c.prune_layer]
        self.costs = profile_tree_costs(model, self.head, self.layer) if c.dynamic else None
        self._shortlist: list[torch.Tensor] = []  # this step's draft top tokens (the pruning shortlist)
        self.calibration = 1.0  # observed / predicted accepted length (dynamic trees), learned online

    # ------------------------------------------------------------------------------------------------ drafting
    def _children(self, h: torch.Tensor, k: int, prev: torch.Tensor | None = None):
        """Each row's ``k`` most probable children (token ids, probabilities), ranked as the head's guesses rank
        (``EarlyExitHead.ranked``), from one head call, and the pruning shortlist (the draft's top
        ``prune_shortlist`` ids per row, None without pruning by shortlist). ``h``: [B, W, H]."""
        c = self.config
        want = c.prune_shortlist if self.prune_head is not None and c.prune_shortlist else 0
        ids, probs = self.head.ranked(h, min(max(k, want), ranked_size(self.head)), prev)
        short = ids[..., :want] if want else None
        return ids[..., :k].tolist(), probs[..., :k].tolist(), short

    def _child_could_pay(self, tree: Tree, level: list[int], spent: float, expected: float) -> bool:
        """Would one child, accepted as surely as its parent, raise expected tokens per predicted second?
        ``spent``: predicted seconds of the drafting levels run so far, this one included."""
        N = len(tree.tokens)
        gain = max(tree.prob[i] for i in level) * self.calibration
        return ((expected + gain) / (spent + self.costs.lower_time(1, 1) + self.costs.upper_time(1, N + 1))
                > expected / (spent + self.costs.upper_time(1, N)))

    def _draft(self, cur: int, n: int, budget_depth: int, cache, dev, prev: torch.Tensor | None = None):
        """Build the tree level by level; returns it and every node's layer-d state [1, N, H] in node order.
        ``prev``: f(t-1) of the root [1, 1, H], for a head that reads it (the root's level only)."""
        m, d, c = self.model, self.layer, self.config
        tree = Tree()
        tree.add(cur, -1, 1.0)
        level, states = [0], []
        depth_limit = min(budget_depth, c.max_depth if c.dynamic else len(c.branching))
        spent, expected = 0.0, 1.0  # dynamic trees: predicted seconds of drafting so far, expected tokens
        while True:
            nodes = list(range(len(tree.tokens)))
            see = tree.ancestors(nodes)
            pos = torch.tensor([[n + tree.depth[i] for i in level]], device=dev)
            h = run_layers(m, embed(m, torch.tensor([[tree.tokens[i] for i in level]], device=dev)), 0, d, cache,
                           position_ids=pos, attention_mask=tree_mask(see, level, n, m.dtype, dev))
            states.append(h)
            depth = tree.depth[level[0]]
            if depth >= depth_limit or len(tree.tokens) - 1 >= c.max_nodes:
                break
            if c.dynamic:
                spent += self.costs.lower_time(1, len(level))
                if not self._child_could_pay(tree, level, spent, expected):
                    break  # not even a certain child would pay for its cost: skip the head too
            width = c.max_children if c.dynamic else c.branching[depth]
            (tok,), (pr,), short = self._children(h, width, prev)
            prev = None
            if short is not None:
                self._shortlist.append(short.flatten())
            cands = sorted(((tree.prob[p] * q, p, t) for i, p in enumerate(level)
                            for t, q in zip(tok[i], pr[i])), reverse=True)
            room = c.max_nodes - (len(tree.tokens) - 1)
            if c.dynamic:
                # Keep the q most probable children that maximise expected tokens per predicted second of the
                # step (drafting levels so far + their lower pass + verification of the grown tree); q = 0 stops.
                N = len(tree.tokens)
                best_q, best, gain = 0, expected / (spent + self.costs.upper_time(1, N)), 0.0
                for q, (prob, _, _) in enumerate(cands[:room], 1):
                    gain += prob * self.calibration
                    value = (expected + gain) / (spent + self.costs.lower_time(1, q) + self.costs.upper_time(1, N + q))
                    if value > best:
                        best_q, best = q, value
                chosen = cands[:best_q]
                expected += sum(x[0] for x in chosen) * self.calibration
            else:
                chosen = cands[:room]
            if not chosen:
                break
            level = [tree.add(t, p, prob) for prob, p, t in sorted(chosen, key=lambda x: x[1])]
        return tree, torch.cat(states, dim=1)

    # ------------------------------------------------------------------------------------------------ verifying
    def _prune_test(self, tree: Tree, h: torch.Tensor, shortlist: list[torch.Tensor]):
        """Whether node i's token is among its parent's top-``prune_top`` under the layer-p head. With a shortlist
        the ranking is among the tokens the draft head rated highly at any node (a few hundred rows of the
        projection instead of the vocabulary): a rank there is never worse than in the vocabulary, so the shortlist
        only ever keeps more nodes. Pruning never affects exactness, only how much is verified. ``h``: the nodes'
        layer-p states [1, N, H] in node order; ``shortlist``: the draft's top tokens collected this step."""
        c = self.config
        if not c.prune_shortlist:
            top = self.prune_head(h)[0].topk(c.prune_top, dim=-1).indices.tolist()
            return lambda i: tree.tokens[i] in top[tree.parent[i]]
        ids = torch.unique(torch.cat(shortlist + [torch.tensor(tree.tokens, device=h.device)]))
        head = self.prune_head
        logits = nn_linear(head.features(h[0]), head.lm_head.weight[ids])  # [N, |shortlist|]
        kth = logits.topk(min(c.prune_top, len(ids)), dim=-1).values[:, -1]
        col = {t: j for j, t in enumerate(ids.tolist())}
        return lambda i: bool(logits[tree.parent[i], col[tree.tokens[i]]] >= kth[tree.parent[i]])

    def _verify(self, tree: Tree, states: torch.Tensor, n: int, cache, dev):
        """Final-layer argmax per surviving node; returns (survivors in node order, argmax by node, the last layer's
        states of the survivors [1, S, H] in that order)."""
        m, d, L = self.model, self.layer, num_layers(self.model)
        nodes = list(range(len(tree.tokens)))
        see = tree.ancestors(nodes)
        pos = torch.tensor([[n + x for x in tree.depth]], device=dev)
        dtype = states.dtype
        p = self.config.prune_layer
        if self.prune_head is None:
            h = run_layers(m, states, d, L, cache, position_ids=pos, attention_mask=tree_mask(see, nodes, n, dtype, dev))
            return nodes, dict(zip(nodes, final_argmax(m, h)[0].tolist())), h
        h = run_layers(m, states, d, p, cache, position_ids=pos, attention_mask=tree_mask(see, nodes, n, dtype, dev))
        alive = [True] * len(nodes)
        survives = self._prune_test(tree, h, self._shortlist)
        for i in nodes[1:]:  # parents come before children
            alive[i] = alive[tree.parent[i]] and survives(i)
        keep = [i for i in nodes if alive[i]]
        sub = tree.ancestors(keep)
        idx = torch.tensor(keep, device=dev)
        h = run_layers(m, h.index_select(1, idx), p, L, cache, position_ids=pos.index_select(1, idx),
                       attention_mask=tree_mask(sub, list(range(len(keep))), n, dtype, dev))
        return keep, dict(zip(keep, final_argmax(m, h)[0].tolist())), h

    def _generate(self, ids, max_new_tokens):
        m, L = self.model, num_layers(self.model)
        dev = ids.device
        cache = new_cache(m)
        cur = int(prefill(m, ids, cache).argmax())
        out: list[int] = []
        res = self.new_result(out, steps=1)
        if self.finish(out, [cur], max_new_tokens):
            return res
        n = ids.numel()
        p = self.config.prune_layer if self.prune_head is not None else L
        prev = None  # f(t-1) of `cur`, for a head that reads it (unknown after the prefill)
        while True:
            self._shortlist = []
            tree, states = self._draft(cur, n, max_new_tokens - len(out) - 1, cache, dev, prev)
            with stopwatch(dev) as t:
                alive, target, final = self._verify(tree, states, n, cache, dev)
            res.stats.verify_seconds.append(t.seconds)  # pruning's saving
            path = accepted_path(tree, alive, target)
            nxt_token = target[path[-1]]
            # Layers 1..p hold every node (drafting order); layers p+1..L only the survivors (their order).
            select_cache(cache, n, [n + i for i in path], range(0, p))
            if p < L:
                rank = {c: r for r, c in enumerate(alive)}
                select_cache(cache, n, [n + rank[i] for i in path], range(p, L))
            res.steps += 1
            res.drafted += len(tree.tokens) - 1
            res.accepted += len(path) - 1
            res.stats.tree_nodes.append(len(tree.tokens) - 1)
            res.stats.survivors.append(len(alive) - 1)
            if self.config.dynamic:  # keep the path-probability estimate honest on this head and data
                self.calibration = updated_calibration(self.calibration, sum(tree.prob[1:]) * self.calibration,
                                                       len(path) - 1)
            n += len(path)
            if self.finish(out, [tree.tokens[i] for i in path[1:]] + [nxt_token], max_new_tokens):
                return res
            cur = nxt_token
            if self.head.reads_prev:  # the verified row whose argmax is the new `cur` (rows in `alive`'s order)
                row = alive.index(path[-1])
                prev = decoder(m).norm(final[:, row:row + 1])

