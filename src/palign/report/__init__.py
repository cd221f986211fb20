"""For readers: the markdown and HTML reports, the plots every run draws, reading a finished run
(every number recomputed from its answers files) and the paper's Table 1 beside palign's."""
