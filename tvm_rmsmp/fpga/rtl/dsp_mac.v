// Fixed-point multiply-accumulate array on DSP48E1 slices (the DSP core of the RMSMP
// accelerator), in two variants chosen by PACK:
//   PACK = 2: two 4-bit products per DSP (the standard packing): one weight times two
//             activations packed into the 25-bit A port, A = (a_hi << S) + a_lo, so the
//             product holds a_hi*w << S plus a_lo*w. The products of up to CHAIN lanes are
//             summed in the packed form (the DSP cascade), then split: the low field is
//             sign-extended from S bits and the high field corrected for its borrow.
//             Exact while |sum of CHAIN low products| < 2^(S-1): CHAIN * 255 * 8 < 32768.
//   PACK = 1: one product per DSP (the papers' baseline).
// 8-bit weights (w8 = 1) always take one product per DSP: only pixels 0..PIX-1 are computed,
// and the activations of pixels PIX..2*PIX-1 must be zero (the controller's job).
// Weight codes: 8 bits per lane; with w8 = 0 the low nibble is a two's-complement 4-bit
// weight (tvm_rmsmp.quant.schemes.nibble_codes for fixed_4), with w8 = 1 an int8.
// act: pixel q (0..PIX*PACK-1; DSP d serves pixels d and d + PIX), lane r at
// bits [(q*RED + r)*8 +: 8]; acc: pixel q at [q*ACCW +: ACCW].
module dsp_mac_array #(
    parameter PIX   = 4,
    parameter RED   = 4,
    parameter PACK  = 2,
    parameter CHAIN = 16,
    parameter ACCW  = 32
) (
    input  wire                      clk,
    input  wire                      en,
    input  wire                      clear,
    input  wire [ACCW-1:0]           bias,   // clear starts the accumulation from it (the row's bias)
    input  wire                      act_signed,
    input  wire                      w8,
    input  wire [PIX*PACK*RED*8-1:0] act,
    input  wire [RED*8-1:0]          wcode,
    output reg  [PIX*PACK*ACCW-1:0]  acc
);
    localparam S   = 16;
    localparam NCH = (RED + CHAIN - 1) / CHAIN;
    wire pack = (PACK == 2) && !w8;
    // Per DSP column d and chain c: a linear chain of partial sums pc (the form Yosys packs
    // into the DSP48E1 post-adders and PCIN cascade), then the split of the packed fields.
    wire [PIX*NCH*48-1:0] chain_lo, chain_hi;
    genvar d, c, k;
    generate
        for (d = 0; d < PIX; d = d + 1) begin : g_dsp
            for (c = 0; c < NCH; c = c + 1) begin : g_chain
                wire signed [47:0] pc [0:CHAIN] /*verilator split_var*/;
                assign pc[0] = 48'sd0;
                for (k = 0; k < CHAIN; k = k + 1) begin : g_lane
                    if (c*CHAIN + k < RED) begin : g_mac
                        localparam R = c*CHAIN + k;
                        wire signed [8:0]  a_lo = {act_signed & act[(d*RED + R)*8 + 7], act[(d*RED + R)*8 +: 8]};
                        wire signed [8:0]  a_hi;
                        if (PACK == 2) begin : g_hi
                            assign a_hi = {act_signed & act[((d+PIX)*RED + R)*8 + 7], act[((d+PIX)*RED + R)*8 +: 8]};
                        end else begin : g_nohi
                            assign a_hi = 9'sd0;
                        end
                        // the DSP48E1 pre-adder: A + D, D = a_hi << S (the controller feeds
                        // zeros in the high slots of 8-bit rows, so no gating here)
                        wire signed [24:0] D = a_hi <<< S;
                        wire signed [24:0] A = D + a_lo;
                        wire signed [17:0] B = w8 ? {{10{wcode[R*8 + 7]}}, wcode[R*8 +: 8]}
                                                  : {{14{wcode[R*8 + 3]}}, wcode[R*8 +: 4]};
                        assign pc[k+1] = pc[k] + A * B;
                    end else begin : g_pad
                        assign pc[k+1] = pc[k];
                    end
                end
                wire signed [47:0] P  = pc[CHAIN];
                wire signed [47:0] lo = pack ? {{(48-S){P[S-1]}}, P[S-1:0]} : P;
                // high field: floor(P / 2^S) plus the borrow of a negative low field
                wire signed [47:0] hi = pack ? ((P >>> S) + $signed({1'b0, P[S-1]})) : 48'sd0;
                assign chain_lo[(d*NCH + c)*48 +: 48] = lo;
                assign chain_hi[(d*NCH + c)*48 +: 48] = hi;
            end
        end
    endgenerate

    integer q, j;
    reg [ACCW-1:0] sum_lo, sum_hi;
    always @(posedge clk) begin
        if (en) begin
            for (q = 0; q < PIX; q = q + 1) begin
                sum_lo = 0;
                sum_hi = 0;
                for (j = 0; j < NCH; j = j + 1) begin
                    sum_lo = sum_lo + chain_lo[(q*NCH + j)*48 +: ACCW];
                    sum_hi = sum_hi + chain_hi[(q*NCH + j)*48 +: ACCW];
                end
                acc[q*ACCW +: ACCW] <= (clear ? bias : acc[q*ACCW +: ACCW]) + sum_lo;
                if (PACK == 2)
                    acc[(q+PIX)*ACCW +: ACCW] <= (clear ? bias : acc[(q+PIX)*ACCW +: ACCW]) + sum_hi;
            end
        end
    end
endmodule
