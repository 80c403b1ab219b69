"""The MF-DETR transformer: an optional deformable encoder over the maps, and a decoder whose
object queries attend to each other, to Mobile-Former's global tokens and to the multi-scale maps,
with iterative box refinement."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from .assigner import fast_nms_order
from .deformable_attention import MSDeformAttn
from .factored_memory import FactoredMemory
from .position_encoding import sine_embed_coords


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them."""

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class FFN(nn.Module):
    """Post-norm feed-forward block: ``norm(x + fc2(dropout(relu(fc1(x)))))``."""

    def __init__(self, dim, ffn_dim, dropout):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x + self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x))))))


class EncoderLayer(nn.Module):
    """Deformable self-attention over all map positions, then an FFN (post-norm)."""

    def __init__(self, dim, ffn_dim, num_levels, num_heads, num_points, dropout):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(self, memory, pos, reference, spatial_shapes, padding_mask):
        """``memory``, ``pos``: ``[N, S, dim]``; ``reference``: ``[N, S, L, 2]``; returns ``[N, S, dim]``."""
        out = self.self_attn(memory + pos, reference, memory, spatial_shapes, padding_mask)
        return self.ffn(self.norm(memory + self.dropout(out)))


class DecoderLayer(nn.Module):
    """Query self-attention; attention to the global tokens (if ``use_tokens``); deformable
    attention to the maps; FFN. Each attention is followed by a residual and a LayerNorm."""

    def __init__(self, dim, ffn_dim, num_levels, num_heads, num_points, dropout, use_tokens=True):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.self_norm = nn.LayerNorm(dim)
        # Without tokens the sub-layer does not exist: no attention, bias or norm runs in its place.
        self.token_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True) if use_tokens else None
        self.token_norm = nn.LayerNorm(dim) if use_tokens else None
        self.cross_attn = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.cross_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(self, query, query_pos, reference, memory, spatial_shapes, padding_mask, tokens=None, token_pos=None,
                self_attn_mask=None):
        """
        Args:
            query, query_pos: ``[N, Q, dim]``.
            reference: ``[N, Q, L, 4]`` boxes (cx, cy, w, h) normalised to each padded level.
            memory: ``[N, S, dim]`` or its ``FactoredMemory``; padding_mask ``[N, S]`` or None.
            tokens, token_pos: ``[N, M, dim]``, the projected global tokens and their embeddings
                (None when the layer was built without ``use_tokens``).
            self_attn_mask: optional ``[N * heads, Q, Q]`` bool, True where a query may not look
                (denoising groups, one-to-many queries).
        Returns:
            ``[N, Q, dim]``.
        """
        q = query + query_pos
        out = self.self_attn(q, q, query, attn_mask=self_attn_mask, need_weights=False)[0]
        query = self.self_norm(query + self.dropout(out))
        if self.token_attn is not None:
            out = self.token_attn(query + query_pos, tokens + token_pos, tokens, need_weights=False)[0]
            query = self.token_norm(query + self.dropout(out))
        out = self.cross_attn(query + query_pos, reference, memory, spatial_shapes, padding_mask)
        query = self.cross_norm(query + self.dropout(out))
        return self.ffn(query)


class Transformer(nn.Module):
    """Encoder (``enc_layers`` may be 0), two-stage query selection (optional) and the decoder.

    Args:
        dim: decoder width. ffn_dim: FFN hidden width. num_levels: feature levels.
        num_queries: object queries. num_classes: foreground classes (sigmoid, no background).
        two_stage: pick the initial reference boxes as the top-scoring map positions (with the
            class and box heads run on every position); else learned reference boxes.
        denoising: build ``label_embed``, the content of denoising queries (see denoising.py).
        aux_loss: class and box heads on every decoder layer (iterative box refinement, a loss per
            layer); False builds them for the last layer only, the earlier layers keep their
            reference boxes (their heads would get no gradient: references are detached).
        use_tokens: decoder layers attend to the global tokens; False builds them without that sub-layer.
        look_forward_twice: DINO's box refinement: layer i's boxes are its offset applied to layer
            i-1's boxes *with* their gradient (the next layer's input reference stays detached),
            so that each layer's box head is also trained by the next layer's loss. Same values.
        num_queries_one2many: H-DETR's hybrid matching: in training only, this many extra queries
            (the next-best two-stage proposals, or their own learned boxes) that no other query
            sees, matched by the criterion to every target repeated several times. 0 = off.
        proposal_assigner: optional :class:`AnchorAssigner` (DETA): in training, every position's
            class score and its positives' boxes are trained against the targets it assigns
            (``enc_outputs["dense"]``) instead of the chosen proposals being matched one-to-one.
        proposal_nms_thresh: > 0: the two-stage proposals skip candidates that overlap a
            higher-scoring one by more than this IoU (:func:`fast_nms_order`, over the best
            ``4 * num_queries`` positions), in training and inference. 0 = off.
    """

    def __init__(self, dim, ffn_dim, num_levels, num_queries, num_classes, enc_layers=0, dec_layers=6,
                 num_heads=8, num_points=4, dropout=0.0, two_stage=True, denoising=False, aux_loss=True,
                 use_tokens=True, look_forward_twice=False, num_queries_one2many=0, proposal_assigner=None,
                 proposal_nms_thresh=0.0):
        super().__init__()
        self.proposal_assigner, self.proposal_nms_thresh = proposal_assigner, proposal_nms_thresh
        self.label_embed = nn.Embedding(num_classes, dim) if denoising else None
        self.num_queries, self.num_queries_one2many, self.two_stage = num_queries, num_queries_one2many, two_stage
        self.look_forward_twice = look_forward_twice
        encoder_layer = EncoderLayer(dim, ffn_dim, num_levels, num_heads, num_points, dropout)
        self.encoder = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(enc_layers))
        decoder_layer = DecoderLayer(dim, ffn_dim, num_levels, num_heads, num_points, dropout, use_tokens)
        self.decoder = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(dec_layers))
        self.query_pos_head = MLP(2 * dim, dim, dim, 2)
        self.query_embed = nn.Embedding(num_queries + num_queries_one2many, dim)
        num_heads_sets = dec_layers if aux_loss else 1
        self.class_heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_heads_sets))
        self.box_heads = nn.ModuleList(MLP(dim, dim, 4, 3) for _ in range(num_heads_sets))
        if two_stage:
            self.enc_output = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
            self.enc_class_head = nn.Linear(dim, num_classes)
            self.enc_box_head = MLP(dim, dim, 4, 3)
        else:
            self.reference_boxes = nn.Embedding(num_queries + num_queries_one2many, 4)
        self._reset_parameters()

    def _reset_parameters(self):
        prior_bias = -4.595  # focal-loss prior: sigmoid = 0.01
        heads = list(self.class_heads) + ([self.enc_class_head] if self.two_stage else [])
        for head in heads:
            nn.init.constant_(head.bias, prior_bias)
        for mlp in list(self.box_heads) + ([self.enc_box_head] if self.two_stage else []):
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        if not self.two_stage:
            nn.init.uniform_(self.reference_boxes.weight, -2.0, 0.0)
            with torch.no_grad():
                self.reference_boxes.weight[:, :2].uniform_(-3.0, 3.0)

    @staticmethod
    def _grid_references(spatial_shapes, valid_ratios, device):
        """Pixel centres of every level, normalised to the valid image: ``[N, S, 2]`` (x, y)."""
        points = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            y, x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, device=device), torch.linspace(0.5, w - 0.5, w, device=device),
                indexing="ij",
            )
            xy = torch.stack([x.reshape(-1) / w, y.reshape(-1) / h], -1)         # padded-normalised
            points.append(xy[None] / valid_ratios[:, None, lvl])                # valid-normalised
        return torch.cat(points, 1)

    def _select_queries(self, memory, padding_mask, spatial_shapes, valid_ratios, num_queries, targets=None):
        """Two-stage: score every position, keep the top ``num_queries`` as reference boxes.

        The box head runs on the selected positions only (and on the NMS candidates and the
        assigner's positives, when those are on). Returns (reference boxes ``[N, Q, 4]`` in
        sigmoid space, detached; encoder outputs ``{"pred_logits": [N, Q, K], "pred_boxes":
        [N, Q, 4]}`` of the selected positions, plus ``"dense"`` when ``targets`` are given and
        there is a ``proposal_assigner``: ``{"logits": [N, S, K], "boxes": [N, S, 4] (computed at
        the positives only, zero elsewhere), "indices": per image (positives, their targets),
        "counted": [N, S] the positions the class loss counts}``).
        """
        device = valid_ratios.device
        centres = self._grid_references(spatial_shapes, valid_ratios, device)          # [N, S, 2]
        level_sizes = torch.cat([
            torch.full((h * w,), 0.05 * 2.0 ** lvl, device=device) for lvl, (h, w) in enumerate(spatial_shapes)
        ])
        anchors = torch.cat([centres, level_sizes[None, :, None].expand(*centres.shape[:2], 2)], -1)
        valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1)
        if padding_mask is not None:
            valid = valid & ~padding_mask
        if isinstance(memory, FactoredMemory):  # inference.fold_neck: enc_output[0] is a MemoryLinear
            output = self.enc_output[1](torch.cat(self.enc_output[0](memory, rows=True), 1))
        else:
            output = self.enc_output(memory)
        logits = self.enc_class_head(output)
        scores = logits.max(-1)[0].masked_fill(~valid, float("-inf"))
        k = min(num_queries, scores.shape[1])
        if self.proposal_nms_thresh > 0:
            with torch.no_grad():
                candidate_scores, candidates = scores.topk(min(4 * k, scores.shape[1]), dim=1)
                rows = torch.gather(output, 1, candidates[..., None].expand(-1, -1, output.shape[-1]))
                anchor_logits = inverse_sigmoid(torch.gather(anchors, 1, candidates[..., None].expand(-1, -1, 4)))
                boxes = (self.enc_box_head(rows) + anchor_logits).sigmoid()
                keys = fast_nms_order(boxes, candidate_scores, self.proposal_nms_thresh)
                topk = torch.gather(candidates, 1, keys.topk(k, dim=1)[1])
        else:
            topk = scores.topk(k, dim=1)[1]

        def gather(x):
            return torch.gather(x, 1, topk[..., None].expand(-1, -1, x.shape[-1]))

        dense = None
        if targets is not None and self.proposal_assigner is not None:
            assignments = self.proposal_assigner(anchors, valid, targets)
            batch = torch.cat([torch.full_like(p, i) for i, (p, _, _) in enumerate(assignments)])
            positions = torch.cat([p for p, _, _ in assignments])
            dense_boxes = (self.enc_box_head(output[batch, positions]) + inverse_sigmoid(anchors[batch, positions])).sigmoid()
            # every position's row, for the criterion's loss_set; only the positives' are ever read
            boxes = dense_boxes.new_zeros(*anchors.shape[:2], 4).index_put((batch, positions), dense_boxes)
            dense = {"logits": logits, "boxes": boxes, "indices": [(p, gt) for p, gt, _ in assignments],
                     "counted": torch.stack([c for _, _, c in assignments])}

        # An invalid position (chosen only when fewer than k are valid) reads a zero memory, as in
        # Deformable DETR; masking the k chosen rows instead of all S costs nothing.
        chosen = torch.gather(valid, 1, topk)[..., None]
        empty = self.enc_output[1](self.enc_output[0].bias[None])                 # enc_output of a zero row
        output = torch.where(chosen, gather(output), empty)
        logits = torch.where(chosen, gather(logits), self.enc_class_head(empty))
        anchors = inverse_sigmoid(gather(anchors)).masked_fill(~chosen, 0.0)
        boxes = self.enc_box_head(output) + anchors                              # sigmoid space
        enc_outputs = {"pred_logits": logits, "pred_boxes": boxes.sigmoid()}
        if dense is not None:
            enc_outputs["dense"] = dense
        return boxes.detach().sigmoid(), enc_outputs

    def forward(self, memory, pos, padding_mask, spatial_shapes, valid_ratios, tokens=None, token_pos=None,
                denoising=None, targets=None):
        """
        Args:
            memory: ``[N, S, dim]`` flattened maps of all levels, or their ``FactoredMemory``
                (inference with the neck folded in, no encoder); pos: their position encoding
                (used by the encoder only).
            padding_mask: ``[N, S]`` bool, True on padding; None when no image is padded.
            spatial_shapes: list of ``(H_l, W_l)``.
            valid_ratios: ``[N, L, 2]`` valid width and height of each level over its padded size.
            tokens, token_pos: ``[N, M, dim]`` (None when the decoder does not use tokens).
            denoising: optional dict of ``build_denoising_queries``: its D queries go first.
            targets: the criterion's targets, for the ``proposal_assigner`` (training only).
        Returns:
            (list over the decoder layers that have heads (all, or the last without ``aux_loss``) of
            ``(logits [N, D+Q+Q2, K], boxes [N, D+Q+Q2, 4] cxcywh in [0, 1])``, encoder outputs dict
            of the Q one-to-one proposals or None). Q2 = ``num_queries_one2many`` in training, else 0.
        """
        if len(self.encoder):
            reference = self._grid_references(spatial_shapes, valid_ratios, valid_ratios.device)
            reference = reference[:, :, None] * valid_ratios[:, None]            # [N, S, L, 2]
            for layer in self.encoder:
                memory = layer(memory, pos, reference, spatial_shapes, padding_mask)

        n, device = valid_ratios.shape[0], valid_ratios.device
        num_one2many = self.num_queries_one2many if self.training else 0
        num_queries = self.num_queries + num_one2many
        enc_outputs = None
        if self.two_stage:
            reference, enc_outputs = self._select_queries(memory, padding_mask, spatial_shapes, valid_ratios,
                                                          num_queries, targets if self.training else None)
            enc_outputs = {k: (v if k == "dense" else v[:, : self.num_queries]) for k, v in enc_outputs.items()}
        else:
            reference = self.reference_boxes.weight[:num_queries].sigmoid()[None].expand(n, -1, -1)
        query = self.query_embed.weight[None, : reference.shape[1]].expand(n, -1, -1)
        self_attn_mask = self._self_attn_mask(denoising, reference.shape[1], num_one2many, device)
        if denoising is not None:
            query = torch.cat([denoising["query"].to(query.dtype), query], 1)
            reference = torch.cat([denoising["reference"], reference], 1)

        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]            # [N, 1, L, 4]
        outputs = []
        first_head = len(self.decoder) - len(self.class_heads)
        previous = reference                        # the previous layer's boxes, with their gradient
        for i, layer in enumerate(self.decoder):
            query_pos = self.query_pos_head(sine_embed_coords(reference, query.shape[-1] // 2).to(query.dtype))
            query = layer(query, query_pos, reference[:, :, None] * ratios, memory, spatial_shapes,
                          padding_mask, tokens, token_pos, self_attn_mask)
            if i >= first_head:
                delta = self.box_heads[i - first_head](query)
                refined = (delta + inverse_sigmoid(reference)).sigmoid()
                # look forward twice: the same values, but the loss of these boxes also reaches
                # the previous layer's box head (one layer back, not further)
                boxes = (delta + inverse_sigmoid(previous)).sigmoid() if self.look_forward_twice else refined
                outputs.append((self.class_heads[i - first_head](query), boxes))
                previous, reference = refined, refined.detach()
        return outputs, enc_outputs

    def _self_attn_mask(self, denoising, num_queries, num_one2many, device):
        """The decoder self-attention mask (True = blocked), or None when nothing is blocked:
        ``[N * heads, D+Q+Q2, D+Q+Q2]`` with denoising queries (their mask, see denoising.py), else
        ``[Q+Q2, Q+Q2]``. The last Q2 one-to-many queries see only each other, and no other query
        sees them: the rest computes exactly what it computes without them."""
        mask = None if denoising is None else denoising["attn_mask"]
        if num_one2many:
            size = mask.shape[-1] if mask is not None else num_queries
            start = size - num_queries                                           # first object query
            split = size - num_one2many                                          # first one-to-many query
            block = torch.zeros(size, size, dtype=torch.bool, device=device)
            block[:split, split:] = True          # neither denoising nor one-to-one queries see them
            block[split:, start:split] = True
            mask = block if mask is None else mask | block
        if mask is not None and mask.dim() == 3:
            # one [D+Q, D+Q] mask per image and attention head, as nn.MultiheadAttention takes it
            mask = mask.repeat_interleave(self.decoder[0].self_attn.num_heads, 0)
        return mask
