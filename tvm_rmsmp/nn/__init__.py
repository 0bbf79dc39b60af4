"""The torch side: RMSMP reference layers and their custom ops, calibration, the Hessian
estimate, post-training quantization, QAT and the layer-wise baseline. Imports ``quant`` and
torch; never TVM or the compiler."""

from .layers import RMSMPConv2d, RMSMPLinear, calibrate, quantize, rmsmp_layers, row_plans
from .residual import RMSMPAdd, RMSMPAvgPool, RMSMPMaxPool
from .qat import QATConfig, convert_qat, prepare_qat, train_qat
from .saved import load_quantized, save_quantized

__all__ = ["RMSMPLinear", "RMSMPConv2d", "RMSMPAdd", "RMSMPAvgPool", "RMSMPMaxPool", "quantize", "calibrate",
           "rmsmp_layers", "row_plans", "QATConfig", "prepare_qat", "train_qat", "convert_qat", "save_quantized",
           "load_quantized"]
