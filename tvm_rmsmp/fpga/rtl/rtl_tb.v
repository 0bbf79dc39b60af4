// Simulation top for tvm_rmsmp/fpga/rtl_sim.py: one instance of each unit, small sizes chosen
// to exercise the index arithmetic (odd lane counts) and the packed DSP's chain split.
module rtl_tb #(
    parameter SP2_PIX = 3,  parameter SP2_RED = 5,
    parameter DP_PIX  = 2,  parameter DP_RED  = 20, parameter DP_CHAIN = 16,
    parameter D1_PIX  = 3,  parameter D1_RED  = 5,
    parameter LANES   = 4
) (
    input  wire clk,
    input  wire act_signed,
    input  wire [31:0] bias,   // the arrays' accumulators start from it on clear (the output row's bias)
    // SP2 shift-add array
    input  wire sp2_en, input wire sp2_clear,
    input  wire [SP2_PIX*SP2_RED*8-1:0] sp2_act,
    input  wire [SP2_RED*4-1:0]         sp2_w,
    output wire [SP2_PIX*32-1:0]        sp2_acc,
    // Fixed-4 LUT multiplier array
    input  wire l4_en, input wire l4_clear,
    input  wire [SP2_PIX*SP2_RED*8-1:0] l4_act,
    input  wire [SP2_RED*4-1:0]         l4_w,
    output wire [SP2_PIX*32-1:0]        l4_acc,
    // DSP array, two products per DSP
    input  wire dp_en, input wire dp_clear, input wire dp_w8,
    input  wire [DP_PIX*2*DP_RED*8-1:0] dp_act,
    input  wire [DP_RED*8-1:0]          dp_w,
    output wire [DP_PIX*2*32-1:0]       dp_acc,
    // DSP array, one product per DSP
    input  wire d1_en, input wire d1_clear, input wire d1_w8,
    input  wire [D1_PIX*D1_RED*8-1:0]   d1_act,
    input  wire [D1_RED*8-1:0]          d1_w,
    output wire [D1_PIX*32-1:0]         d1_acc,
    // requantization ALU
    input  wire alu_en, input wire [2:0] alu_op,
    input  wire [LANES*32-1:0] alu_acc, input wire [LANES*32-1:0] alu_acc_b,
    input  wire [LANES*32-1:0] alu_operand,
    input  wire [LANES*6-1:0]  alu_shift,
    output wire [LANES*32-1:0] alu_res
);
    sp2_array #(.PIX(SP2_PIX), .RED(SP2_RED)) u_sp2 (
        .clk(clk), .en(sp2_en), .clear(sp2_clear), .bias(bias), .act_signed(act_signed),
        .act(sp2_act), .wcode(sp2_w), .acc(sp2_acc));
    lut_mac_array #(.PIX(SP2_PIX), .RED(SP2_RED)) u_l4 (
        .clk(clk), .en(l4_en), .clear(l4_clear), .bias(bias), .act_signed(act_signed),
        .act(l4_act), .wcode(l4_w), .acc(l4_acc));
    dsp_mac_array #(.PIX(DP_PIX), .RED(DP_RED), .PACK(2), .CHAIN(DP_CHAIN)) u_dp (
        .clk(clk), .en(dp_en), .clear(dp_clear), .bias(bias), .act_signed(act_signed), .w8(dp_w8),
        .act(dp_act), .wcode(dp_w), .acc(dp_acc));
    dsp_mac_array #(.PIX(D1_PIX), .RED(D1_RED), .PACK(1)) u_d1 (
        .clk(clk), .en(d1_en), .clear(d1_clear), .bias(bias), .act_signed(act_signed), .w8(d1_w8),
        .act(d1_act), .wcode(d1_w), .acc(d1_acc));
    requant_alu #(.LANES(LANES)) u_alu (
        .clk(clk), .en(alu_en), .op(alu_op), .acc_in(alu_acc), .acc_b(alu_acc_b), .operand(alu_operand),
        .shift(alu_shift), .res(alu_res));
endmodule
