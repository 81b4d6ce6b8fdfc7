"""The neuron mathematics: ExpG-IF's levels, quantizer and spike emitter (`neurons`), the
multi-step LIF baseline trained with STBP (`stbp`), and the spike counters both report (`spike_stats`).
Depends on nothing else in the package.
"""
