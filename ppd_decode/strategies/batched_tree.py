"""Token trees for a batch of rows: ``tree_speculative``'s drafting, early pruning and dynamic size on a
``RaggedBatch`` (rows of different lengths decoded together, each token-identical to greedy alone).

Each row drafts its own tree with layers 1..d and the head, one level per forward: level l of every row is one
block [B, W_l] (W_l the widest row's level; narrower rows pad with slots that see only themselves), appended to
the cache of layers 1..d. Verification runs layers d+1..L once over all levels' columns of all rows, with a
per-row tree mask (a node sees the row's valid cache columns, its ancestors and itself). With pruning, layers
p+1..L run on each row's survivors only (padded to the most survivors of any row) and their cache entries are
scattered back to the nodes' columns, so every layer keeps the same column layout. Acceptance is per row: the
accepted path's columns stay valid, every other node becomes a hole (``RaggedBatch.commit_columns``): no cache
entry is moved, and the path's keys already carry the right rotary positions (prefix length + depth).

Dynamic trees choose, at each level, one number of children q for every row (padding makes the step cost a
function of the widest row): the q that maximises all rows' expected accepted tokens per predicted second,
from a cost profile of this machine by batch size and rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ppd_decode.models.heads import F_PREV, H_D
from ppd_decode.profiling.step_cost import StepCosts, profile_steps
from ppd_decode.runtime.ragged import RaggedBatch
from ppd_decode.runtime.stack import decoder, embed, final_argmax, num_layers
from ppd_decode.runtime.timing import stopwatch
from ppd_decode.runtime.token_tree import Tree, accepted_path
from ppd_decode.strategies.base import DecodeResult, pick_head, register
from ppd_decode.strategies.batched import BatchedDecoding
from ppd_decode.strategies.tree_speculative import (
    TREE_ROWS,
    TreeSpeculative,
    TreeSpeculativeConfig,
    TreeStats,
    updated_calibration,
)


@dataclass
class BatchedTreeConfig(TreeSpeculativeConfig):
    max_batch_size: int = 16


def profile_batch_tree_costs(model, head, d: int, batches=(1, 2, 4, 8, 16), rows=TREE_ROWS, context: int = 256,
                             repeats: int = 3) -> StepCosts:
    """A drafting level (layers 1..d + head) and verification (layers d+1..L + final head) over [b, q]."""
    return profile_steps(model, head, d, batches=batches, lower_rows=rows, upper_rows=rows, context=context,
                         repeats=repeats)


def _visibility(trees: list[Tree], col: list[list[int]], nodes: list[list[int]], width: int) -> torch.Tensor:
    """bool [B, max_b len(nodes[b]), width]: row j of b sees the block columns (``col[b][node]``) of node
    ``nodes[b][j]`` and its ancestors; rows past a row's nodes (padding) see nothing."""
    see = torch.zeros(len(trees), max(map(len, nodes)), width, dtype=torch.bool)
    for b, (tree, ns) in enumerate(zip(trees, nodes)):
        see[b, :len(ns), torch.tensor(col[b])] = tree.ancestors(list(range(len(col[b]))))[ns]
    return see


@register
class BatchedTreeSpeculative(BatchedDecoding):
    name = "batched_tree_speculative"
    Stats = TreeStats
    Config = BatchedTreeConfig
    needs_heads = True
    head_inputs = (H_D, F_PREV)  # f(t-1) for each row's root level (a block head's prefix is not kept per row)

    def __init__(self, model, config=None, heads=None, tokenizer=None):
        super().__init__(model, config, heads, tokenizer)
        pick_head(self, self.config.layer)  # refuses what this strategy cannot feed (the single-row one feeds more)
        # The single-row strategy checks the configuration and holds the heads; its pruning rule is reused (not its
        # batch-1 cost profile: this one profiles by batch size below).
        self.single = TreeSpeculative(model, replace(self.config, dynamic=False), heads, tokenizer)
        self.layer, self.head, self.prune_head = self.single.layer, self.single.head, self.single.prune_head
        self.costs = None
        if self.config.dynamic:
            # One profile per process for every batch size up to 16 (and the configured maximum beyond).
            sizes = tuple(sorted({1, 2, 4, 8, 16, self.max_batch_size}))
            self.costs = profile_batch_tree_costs(model, self.head, self.layer, batches=sizes)
        self.calibration = 1.0

    # ------------------------------------------------------------------------------------------------ drafting
    def _draft(self, batch: RaggedBatch, trees: list[Tree], shortlists: list[list[torch.Tensor]],
               prev: torch.Tensor | None = None):
        """Grow every row's tree level by level. Returns the block layout: ``col[b][node]`` (column of each node in
        this step's block), the layer-d states [B, N, H] and the block's tree visibility [B, N, N]. ``prev``: each
        root's f(t-1) [B, 1, H], for a head that reads it (the roots' level only)."""
        m, d, c = self.model, self.layer, self.config
        B, dev = batch.size, batch.cur.device
        col = [[0] for _ in range(B)]
        levels = [[0] for _ in range(B)]
        states, width_so_far = [], 0
        depth = 0
        spent, expected = 0.0, float(B)  # dynamic: predicted seconds so far; expected tokens (every row's bonus)
        while True:
            W = max(map(len, levels))
            N = width_so_far + W
            tokens = torch.full((B, W), self.pad, dtype=torch.long, device=dev)
            positions = batch.pos[:, None].repeat(1, W)
            for b, lvl in enumerate(levels):
                for j, node in enumerate(lvl):
                    tokens[b, j] = trees[b].tokens[node]
                    positions[b, j] += trees[b].depth[node]
            see = _visibility(trees, col, levels, N)
            h = batch.run(embed(m, tokens), 0, d, positions, offset=width_so_far, see_step=see.to(dev))
            states.append(h)
            width_so_far = N
            max_depth = c.max_depth if c.dynamic else len(c.branching)
            if depth >= max_depth or max(len(t.tokens) for t in trees) - 1 >= c.max_nodes:
                break
            if c.dynamic:
                spent += self.costs.lower_time(B, W)
                gain = sum(max(t.prob[i] for i in lvl) for t, lvl in zip(trees, levels)) * self.calibration
                if (expected + gain) / (spent + self.costs.lower_time(B, 1) + self.costs.upper_time(B, N + 1)) \
                        <= expected / (spent + self.costs.upper_time(B, N)):
                    break  # not even one certain child per row would pay: skip the head too
            width = c.max_children if c.dynamic else c.branching[depth]
            toks, prs, short = self.single._children(h, width, prev)  # [B][W][<= width]
            prev = None
            cands = []
            for b, lvl in enumerate(levels):
                if short is not None:
                    shortlists[b].append(short[b, :len(lvl)].flatten())
                tok, pr = toks[b], prs[b]
                cands.append(sorted(((trees[b].prob[p] * q, p, t) for i, p in enumerate(lvl)
                                     for t, q in zip(tok[i], pr[i])), reverse=True))
            room = c.max_nodes - (max(len(t.tokens) for t in trees) - 1)
            if c.dynamic:
                best_q, best, gain = 0, expected / (spent + self.costs.upper_time(B, N)), 0.0
                for q in range(1, min([room] + [len(cs) for cs in cands]) + 1):
                    gain += sum(cs[q - 1][0] for cs in cands) * self.calibration
                    value = (expected + gain) / (spent + self.costs.lower_time(B, q) + self.costs.upper_time(B, N + q))
                    if value > best:
                        best_q, best = q, value
                take = best_q
                expected += sum(x[0] for cs in cands for x in cs[:take]) * self.calibration
            else:
                take = room
            if take == 0:
                break
            for b in range(B):
                chosen = sorted(cands[b][:take], key=lambda x: x[1])
                levels[b] = [trees[b].add(t, p, prob) for prob, p, t in chosen]
                col[b] += [N + j for j in range(len(levels[b]))]
            depth += 1
        see_all = torch.zeros(B, width_so_far, width_so_far, dtype=torch.bool)
        for b, cols in enumerate(col):  # rows in column order (padding columns see nothing here)
            see_all[b, cols] = _visibility(trees[b:b + 1], col[b:b + 1], [list(range(len(cols)))], width_so_far)[0]
        return col, torch.cat(states, dim=1), see_all

    # ------------------------------------------------------------------------------------------------ verifying
    def _survivors(self, tree: Tree, shortlist: list[torch.Tensor], cols: list[int], h_row) -> list[int]:
        """Nodes of one row that survive pruning at layer p: the single-row rule on this row's states."""
        survives = self.single._prune_test(tree, h_row[cols][None], shortlist)
        alive = [True] * len(tree.tokens)
        for i in range(1, len(tree.tokens)):  # parents come before children
            alive[i] = alive[tree.parent[i]] and survives(i)
        return [i for i in range(len(tree.tokens)) if alive[i]]

    def _verify(self, batch: RaggedBatch, trees, col, states, see_all, shortlists):
        """Final-layer argmax at every surviving node: (alive nodes per row, {node: argmax} per row, the final
        layer's states [B, *, H], {node: its index there} per row)."""
        m, d, L = self.model, self.layer, num_layers(self.model)
        B, N, dev = batch.size, states.shape[1], states.device
        positions = batch.pos[:, None].repeat(1, N)
        for b, t in enumerate(trees):
            for i, x in enumerate(t.depth):
                positions[b, col[b][i]] += x
        see_all = see_all | torch.eye(N, dtype=torch.bool)[None]
        p = self.config.prune_layer if self.prune_head is not None else L
        h = batch.run(states, d, p, positions, see_step=see_all.to(dev))
        if p == L:
            target = final_argmax(m, h).tolist()
            return [list(range(len(t.tokens))) for t in trees], [
                {i: target[b][col[b][i]] for i in range(len(t.tokens))} for b, t in enumerate(trees)], h, [
                dict(enumerate(cols)) for cols in col]
        alive = [self._survivors(t, shortlists[b], col[b], h[b]) for b, t in enumerate(trees)]
        S = max(map(len, alive))
        idx = torch.zeros(B, S, dtype=torch.long)
        dump = torch.full((B, S), N, dtype=torch.long)  # where each row's cache entry goes back; padding: column N
        see = torch.zeros(B, S, S, dtype=torch.bool)
        for b, keep in enumerate(alive):
            cols = [col[b][i] for i in keep]
            idx[b, :len(cols)] = dump[b, :len(cols)] = torch.tensor(cols)
            idx[b, len(cols):] = cols[0]  # padding: a copy of the root that sees only itself
            see[b, :len(cols), :len(cols)] = see_all[b][cols][:, cols]
        idx_d = idx.to(dev)
        K = batch.valid.shape[1]
        h = batch.run(h.gather(1, idx_d[..., None].expand(-1, -1, h.shape[-1])), p, L, positions.gather(1, idx_d),
                      see_step=see.to(dev))
        # Layers p+1..L got S columns per row: scatter them back to the nodes' columns (N wide, like layers 1..p);
        # padding goes to a spare column that is cut off.
        dump = dump.to(dev)
        for layer in batch.cache.layers[p:L]:
            for name in ("keys", "values"):
                kv = getattr(layer, name)
                Bk, Hh, _, D = kv.shape
                full = kv.new_zeros(Bk, Hh, N + 1, D)
                full.scatter_(2, dump[:, None, :, None].expand(Bk, Hh, S, D), kv[..., K:, :])
                setattr(layer, name, torch.cat([kv[..., :K, :], full[..., :N, :]], dim=2))
        target = final_argmax(m, h).tolist()
        return alive, [{i: target[b][j] for j, i in enumerate(keep)} for b, keep in enumerate(alive)], h, [
            {i: j for j, i in enumerate(keep)} for keep in alive]

    # ------------------------------------------------------------------------------------------------ the loop
    def _decode(self, prompts: list[list[int]], max_new_tokens: int) -> list[DecodeResult]:
        batch = RaggedBatch(self.model, prompts, self.pad)
        results = [self.new_result([], steps=1) for _ in prompts]
        self._finish_rows(batch, results, [[t] for t in batch.cur.tolist()], max_new_tokens)
        prev = None  # [B, 1, H]: f(t-1) of each row's `cur`, for a head that reads it (unknown after the prefill)
        while batch.size:
            trees = []
            for t in batch.cur.tolist():
                tree = Tree()
                tree.add(t, -1, 1.0)
                trees.append(tree)
            shortlists = [[] for _ in trees]
            col, states, see_all = self._draft(batch, trees, shortlists, prev)
            with stopwatch(self.model.device) as t:
                alive, target, final, where = self._verify(batch, trees, col, states, see_all, shortlists)
            verify_s = t.seconds
            keep = torch.zeros(batch.size, states.shape[1], dtype=torch.bool)
            new, predicted, got, last = [], 0.0, 0, []
            for b, (tree, row) in enumerate(zip(trees, batch.rows)):
                path = accepted_path(tree, alive[b], target[b])
                last.append(where[b][path[-1]])
                for i in path:
                    keep[b, col[b][i]] = True
                res = results[row]
                res.steps += 1
                res.drafted += len(tree.tokens) - 1
                res.accepted += len(path) - 1
                res.stats.tree_nodes.append(len(tree.tokens) - 1)
                res.stats.survivors.append(len(alive[b]) - 1)
                res.stats.verify_seconds.append(verify_s)
                predicted += sum(tree.prob[1:]) * self.calibration
                got += len(path) - 1
                new.append([tree.tokens[i] for i in path[1:]] + [target[b][path[-1]]])
            if self.config.dynamic:  # one estimate for the batch: all rows' drafts against all rows' accepts
                self.calibration = updated_calibration(self.calibration, predicted, got)
            batch.commit_columns(keep.to(batch.valid.device))
            batch.cur = torch.tensor([toks[-1] for toks in new], device=batch.cur.device)
            if self.head.reads_prev:  # each row's verified state whose argmax is its new `cur`
                at = torch.tensor(last, device=final.device)[:, None, None].expand(-1, 1, final.shape[-1])
                prev = decoder(self.model).norm(final.gather(1, at))
            live = self._finish_rows(batch, results, new, max_new_tokens)
            if prev is not None and live is not None:
                prev = prev[live]
        return results
