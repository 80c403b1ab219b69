"""The MF-DETR transformer: an optional deformable encoder over the maps, and a decoder whose
object queries attend to each other, to Mobile-Former's global tokens and to the multi-scale maps,
with iterative box refinement."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from .deformable_attention import MSDeformAttn
from .distribution import distance_to_box, integral, weighting_function
from .factored_memory import MemoryLinear
from .position_encoding import sine_embed_coords
from .query_selection import DenseProposals, grid_anchors, grid_centres, inverse_sigmoid, top_positions


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
            memory: the neck's memory, read by ``cross_attn``'s ``MemoryLinear`` only; padding_mask ``[N, S]`` or None.
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
        proposal_nms_thresh: > 0: the two-stage proposals skip candidates that overlap a
            higher-scoring one by more than this IoU (:func:`~.query_selection.fast_nms_order`, over
            the best ``4 * num_queries`` positions), in training and inference. 0 = off.
        box_refinement: ``"offset"`` (Deformable DETR: each layer's box head adds an offset to the
            previous boxes in logit space) or ``"distribution"`` (D-FINE's FDR: the first layer's
            ``pre_box_head`` gives anchor boxes; each layer's box head adds to the previous layer's
            logits of four edge-distance distributions over ``reg_max + 1`` bins
            (:mod:`.distribution`), whose expectations place the edges around the anchors). The
            second needs ``aux_loss``.
        reg_max, reg_scale, reg_up: FDR's bins: :func:`~.distribution.weighting_function`.
    """

    def __init__(self, dim, ffn_dim, num_levels, num_queries, num_classes, enc_layers=0, dec_layers=6,
                 num_heads=8, num_points=4, dropout=0.0, two_stage=True, denoising=False, aux_loss=True,
                 use_tokens=True, look_forward_twice=False, num_queries_one2many=0, proposal_nms_thresh=0.0,
                 box_refinement="offset", reg_max=32, reg_scale=4.0, reg_up=0.5):
        super().__init__()
        if box_refinement not in ("offset", "distribution"):
            raise ValueError(f"MODEL.MF_DETR.DECODER.BOX_REFINEMENT must be 'offset' or 'distribution', got {box_refinement!r}")
        self.distribution = box_refinement == "distribution"
        if self.distribution and (not aux_loss or look_forward_twice):
            raise ValueError("MODEL.MF_DETR.DECODER.BOX_REFINEMENT 'distribution' refines every layer's distributions: "
                             "set DECODER.AUX_LOSS True and DECODER.LOOK_FORWARD_TWICE False")
        self.proposal_nms_thresh = proposal_nms_thresh
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
        box_out = 4 * (reg_max + 1) if self.distribution else 4
        self.box_heads = nn.ModuleList(MLP(dim, dim, box_out, 3) for _ in range(num_heads_sets))
        if self.distribution:
            self.pre_box_head = MLP(dim, dim, 4, 3)
            self.reg_scale = reg_scale
            # derived from the config, not a weight: not saved in checkpoints
            self.register_buffer("project", weighting_function(reg_max, reg_up, reg_scale), persistent=False)
        if two_stage:
            self.enc_output = nn.Sequential(MemoryLinear(dim, dim), nn.LayerNorm(dim))
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
        box_mlps = list(self.box_heads) + ([self.enc_box_head] if self.two_stage else [])
        # zero last layers: offsets 0, or uniform distributions whose expectation is 0 (the anchor)
        for mlp in box_mlps + ([self.pre_box_head] if self.distribution else []):
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        if not self.two_stage:
            nn.init.uniform_(self.reference_boxes.weight, -2.0, 0.0)
            with torch.no_grad():
                self.reference_boxes.weight[:, :2].uniform_(-3.0, 3.0)

    def _select_queries(self, memory, padding_mask, spatial_shapes, valid_ratios, num_queries):
        """Two-stage: score every position, keep the top ``num_queries`` as reference boxes.

        The box head runs on the selected positions only (and on the NMS candidates, when that is
        on). Returns (reference boxes ``[N, Q, 4]`` in [0, 1], detached; encoder outputs
        ``{"pred_logits": [N, Q, K], "pred_boxes": [N, Q, 4]}`` of the selected positions, plus in
        training ``"dense"``: every position's :class:`~.query_selection.DenseProposals`).
        """
        anchors, valid = grid_anchors(spatial_shapes, valid_ratios, padding_mask)  # [N, S, 4], [N, S]
        output = self.enc_output(memory)                                         # [N, S, dim]
        logits = self.enc_class_head(output)
        scores = logits.max(-1)[0].masked_fill(~valid, float("-inf"))
        k = min(num_queries, scores.shape[1])

        def gather(x, index):
            return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))

        def boxes_of(candidates):
            return (self.enc_box_head(gather(output, candidates)) + inverse_sigmoid(gather(anchors, candidates))).sigmoid()

        topk = top_positions(scores, k, self.proposal_nms_thresh, boxes_of)
        # An invalid position (chosen only when fewer than k are valid) reads a zero memory, as in
        # Deformable DETR; masking the k chosen rows instead of all S costs nothing.
        chosen = torch.gather(valid, 1, topk)[..., None]
        empty = self.enc_output[1](self.enc_output[0].bias[None])                 # enc_output of a zero row
        chosen_output = torch.where(chosen, gather(output, topk), empty)
        chosen_logits = torch.where(chosen, gather(logits, topk), self.enc_class_head(empty))
        boxes = self.enc_box_head(chosen_output) + inverse_sigmoid(gather(anchors, topk)).masked_fill(~chosen, 0.0)
        enc_outputs = {"pred_logits": chosen_logits, "pred_boxes": boxes.sigmoid()}
        if self.training:
            enc_outputs["dense"] = DenseProposals(logits, anchors, valid, output, self.enc_box_head)
        return boxes.detach().sigmoid(), enc_outputs

    @torch.no_grad()
    def convert_to_deploy(self, factors):
        """Read the neck's factored memory (``Neck.convert_to_deploy`` gives ``factors``): every
        ``MemoryLinear`` folds them into its weight."""
        for module in self.modules():
            if isinstance(module, MemoryLinear):
                module.convert_to_deploy(factors)

    def forward(self, memory, pos, padding_mask, spatial_shapes, valid_ratios, tokens=None, token_pos=None,
                denoising=None):
        """
        Args:
            memory: the neck's memory: ``[N, S, dim]`` flattened maps of all levels, or after
                ``convert_to_deploy`` their factors (no encoder); pos: ``[N, S, dim]`` their
                position encoding (used by the encoder only).
            padding_mask: ``[N, S]`` bool, True on padding; None when no image is padded.
            spatial_shapes: list of ``(H_l, W_l)``.
            valid_ratios: ``[N, L, 2]`` valid width and height of each level over its padded size.
            tokens, token_pos: ``[N, M, dim]`` (None when the decoder does not use tokens).
            denoising: optional dict of ``build_denoising_queries``: its D queries go first.
        Returns:
            (list over the decoder layers that have heads (all, or the last without ``aux_loss``) of
            ``(logits [N, D+Q+Q2, K], boxes [N, D+Q+Q2, 4] cxcywh in [0, 1])``, encoder outputs dict
            of the Q one-to-one proposals (see ``_select_queries``) or None, and with
            ``box_refinement="distribution"`` a dict for its losses, else None: ``initial`` the first
            layer's ``pre_box_head`` boxes and ``anchors`` the same detached ``[N, D+Q+Q2, 4]``,
            ``corners`` a list over the layers of ``[N, D+Q+Q2, 4 * (reg_max + 1)]`` logits). Q2 =
            ``num_queries_one2many`` in training, else 0.
        """
        if len(self.encoder):
            reference = grid_centres(spatial_shapes, valid_ratios)
            reference = reference[:, :, None] * valid_ratios[:, None]            # [N, S, L, 2]
            for layer in self.encoder:
                memory = layer(memory, pos, reference, spatial_shapes, padding_mask)

        n, device = valid_ratios.shape[0], valid_ratios.device
        num_one2many = self.num_queries_one2many if self.training else 0
        num_queries = self.num_queries + num_one2many
        enc_outputs = None
        if self.two_stage:
            reference, enc_outputs = self._select_queries(memory, padding_mask, spatial_shapes, valid_ratios,
                                                          num_queries)
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
        distributions = {"corners": []} if self.distribution else None
        for i, layer in enumerate(self.decoder):
            query_pos = self.query_pos_head(sine_embed_coords(reference, query.shape[-1] // 2).to(query.dtype))
            layer_input = query
            query = layer(query, query_pos, reference[:, :, None] * ratios, memory, spatial_shapes,
                          padding_mask, tokens, token_pos, self_attn_mask)
            if self.distribution:
                if i == 0:
                    initial = (self.pre_box_head(query) + inverse_sigmoid(reference)).sigmoid()
                    distributions.update(initial=initial, anchors=initial.detach(), project=self.project,
                                         reg_scale=self.reg_scale)
                    corners = 0.0
                # D-FINE: the head also reads the previous layer's output (detached), and adds to its logits
                corners = self.box_heads[i](query if i == 0 else query + layer_input.detach()) + corners
                boxes = distance_to_box(distributions["anchors"], integral(corners, self.project), self.reg_scale)
                outputs.append((self.class_heads[i](query), boxes))
                distributions["corners"].append(corners)
                reference = boxes.detach()
            elif i >= first_head:
                delta = self.box_heads[i - first_head](query)
                refined = (delta + inverse_sigmoid(reference)).sigmoid()
                # look forward twice: the same values, but the loss of these boxes also reaches
                # the previous layer's box head (one layer back, not further)
                boxes = (delta + inverse_sigmoid(previous)).sigmoid() if self.look_forward_twice else refined
                outputs.append((self.class_heads[i - first_head](query), boxes))
                previous, reference = refined, refined.detach()
        return outputs, enc_outputs, distributions

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
