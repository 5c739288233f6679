"""Conv2d geometries every conv test runs: strides, paddings, dilations, padding modes, groups."""

GEOMETRIES = [
    # (in, out, kernel, stride, padding, dilation, groups, padding_mode, bias)
    (4, 6, 3, 1, 1, 1, 1, "zeros", True),
    (4, 6, 3, 2, 0, 1, 1, "zeros", False),
    (4, 6, (3, 5), (2, 1), (1, 2), (2, 1), 1, "zeros", True),
    (4, 6, 3, 1, "same", 2, 1, "zeros", True),
    (4, 6, (2, 4), 1, "same", (1, 3), 1, "reflect", True),  # asymmetric 'same'
    (4, 6, 3, 1, "valid", 1, 1, "zeros", True),
    (4, 6, 3, 1, 2, 2, 1, "reflect", True),
    (4, 6, 3, 2, 1, 1, 1, "replicate", False),
    (4, 6, 3, 1, (1, 2), 1, 1, "circular", True),
    (4, 6, 3, 1, 1, 1, 2, "zeros", True),  # grouped
    (6, 6, 3, 1, 1, 1, 6, "zeros", False),  # depthwise
    (6, 12, 3, 2, 2, 2, 6, "reflect", True),  # depthwise multiplier 2, dilated, reflect
    (8, 4, 1, 1, 0, 1, 4, "zeros", True),  # grouped 1x1 (ShuffleNet)
    (6, 6, 5, 1, "same", 1, 3, "circular", True),
]
