"""The network: synaptic layers and blocks (`blocks`), SSA / GW-SSA (`attention`, with its Pallas
kernel in `attention_kernel`), and the staged Ge2mS-T family (`models`: `create_model`, the size table).
Built on `spiking`.
"""
