"""The neuron mathematics: ExpG-IF's levels, quantizer and spike emitter (`neurons`), the
multi-step LIF baseline trained with STBP (`stbp`), the spike counters both report (`spike_stats`),
and the context of one forward pass that every layer receives (`forward`).
Depends on nothing else in the package.
"""
