// SP2-4 shift-add processing elements (the LUT core of the RMSMP accelerator).
// Plain Verilog-2005, read by Yosys (synthesis) and Verilator (simulation against the ISA
// simulator, tvm_rmsmp/fpga/rtl_sim.py).
//
// Weight code (one nibble, tvm_rmsmp.quant.schemes.nibble_codes for sp2_4, m1 = 2, m2 = 1):
//   code[1:0] = ia, code[2] = ib, code[3] = sign;  |w| = T1[ia] + T2[ib],
//   T1 = (0, 4, 2, 1), T2 = (0, 4):  two shifts of the activation, an add, a conditional negate.
// Activations are 8 bits, unsigned (uint8) or signed (int8) as `act_signed` says.

// p = +-(T1[ia] + T2[ib]) * a. The negation is split for the adder tree: pc = m or ~m (the
// one's complement), neg = 1 when negative, p = pc + neg; sp2_array adds the neg bits of a
// row as one small count instead of carrying a negation per product.
module sp2_mul (
    input  wire        [7:0]  a,
    input  wire               act_signed,
    input  wire        [3:0]  code,
    output wire signed [12:0] pc,
    output wire               neg
);
    wire signed [12:0] ax = {{5{act_signed & a[7]}}, a};
    wire        [1:0]  ia = code[1:0];
    wire signed [12:0] t1 = (ia == 2'd0) ? 13'sd0 : (ax <<< (2'd3 - ia));
    wire signed [12:0] t2 = code[2] ? (ax <<< 2) : 13'sd0;
    wire signed [12:0] m  = t1 + t2;
    assign neg = code[3];
    assign pc  = m ^ {13{neg}};
endmodule

// PIX x RED array: each cycle (en), one weight row's RED codes times PIX pixels' RED
// activations; each pixel's RED products go through an adder tree into its accumulator
// (clear: start a new accumulation from bias, the output row's bias, as the GEMM's first
// reduction tile: the bias takes the place of the zero, no adder of its own).
// act: pixel p, lane r at bits [(p*RED + r)*8 +: 8]; wcode: lane r at [r*4 +: 4];
// acc: pixel p at [p*ACCW +: ACCW].
module sp2_array #(
    parameter PIX  = 4,
    parameter RED  = 4,
    parameter ACCW = 32
) (
    input  wire                  clk,
    input  wire                  en,
    input  wire                  clear,
    input  wire [ACCW-1:0]       bias,   // clear starts the accumulation from it (the row's bias)
    input  wire                  act_signed,
    input  wire [PIX*RED*8-1:0]  act,
    input  wire [RED*4-1:0]      wcode,
    output reg  [PIX*ACCW-1:0]   acc
);
    wire signed [PIX*RED*13-1:0] prod;
    wire        [PIX*RED-1:0]    negs;
    genvar p, r;
    generate
        for (p = 0; p < PIX; p = p + 1) begin : g_pix
            for (r = 0; r < RED; r = r + 1) begin : g_red
                sp2_mul u_mul (.a(act[(p*RED + r)*8 +: 8]), .act_signed(act_signed),
                               .code(wcode[r*4 +: 4]), .pc(prod[(p*RED + r)*13 +: 13]),
                               .neg(negs[p*RED + r]));
            end
        end
    endgenerate

    // adder tree per pixel at the width the sum needs (13 bits per product + log2 RED)
    localparam SUMW = 13 + $clog2(RED + 1);
    integer i, j;
    reg signed [SUMW-1:0] sum;
    always @(posedge clk) begin
        if (en) begin
            for (i = 0; i < PIX; i = i + 1) begin
                sum = 0;
                for (j = 0; j < RED; j = j + 1)
                    sum = sum + $signed(prod[(i*RED + j)*13 +: 13]) + $signed({1'b0, negs[i*RED + j]});
                acc[i*ACCW +: ACCW] <= (clear ? bias : acc[i*ACCW +: ACCW]) + {{(ACCW-SUMW){sum[SUMW-1]}}, sum};
            end
        end
    end
endmodule
