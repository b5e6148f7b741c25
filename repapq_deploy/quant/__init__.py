"""Integer schemes, fake-quantization modules and quantizer placement."""
