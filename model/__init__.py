"""Model code: the decoder LM, the frozen vision encoder, VideoSummary and the VLM that joins them."""
