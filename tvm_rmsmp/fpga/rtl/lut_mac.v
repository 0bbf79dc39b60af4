// Fixed-4 multiply-accumulate array built from LUTs (no DSP slices): the LUT core of the
// `fixed4_lut_dsp` baseline, which runs Fixed-4 rows on the DSPs and on LUT multipliers at
// once. Same layout as sp2_array (sp2_pe.v): PIX x RED products per cycle, one weight row,
// an adder tree per pixel into its accumulator. Weight code: a two's-complement nibble
// w = -8 w3 + 4 w2 + 2 w1 + w0, recoded as two radix-4 Booth digits, w = 4 d1 + d0 with
// d0, d1 in {-2..2}: each digit selects 0, a or 2a and a sign, so a Fixed-4 product is two
// terms like an SP2 product (sp2_pe.v), plus the recoding. The negative terms are one's
// complements with their +1 carries counted in the sum. (Yosys 0.23 maps a behavioural
// `a * w` with -nodsp to about 1.6x the LUTs of this form.)
module booth4_mul (
    input  wire        [7:0]  a,
    input  wire               act_signed,
    input  wire        [3:0]  w,
    output wire signed [12:0] p
);
    wire signed [12:0] ax = {{5{act_signed & a[7]}}, a};
    wire one0 = w[0],          two0 = w[1] & ~w[0],  neg0 = w[1];
    wire one1 = w[2] ^ w[1],   two1 = (~w[3] & w[2] & w[1]) | (w[3] & ~w[2] & ~w[1]);
    wire neg1 = w[3] & ~(w[2] & w[1]);
    wire signed [12:0] m0 = one0 ? ax : (two0 ? (ax <<< 1) : 13'sd0);
    wire signed [12:0] m1 = one1 ? ax : (two1 ? (ax <<< 1) : 13'sd0);
    wire signed [12:0] t0 = neg0 ? ~m0 : m0;
    wire signed [12:0] t1 = neg1 ? ~m1 : m1;
    assign p = t0 + (t1 <<< 2) + $signed({10'd0, neg1, 1'b0, neg0});
endmodule

module lut_mac_array #(
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
    wire [PIX*RED*13-1:0] prod;
    genvar gp, gr;
    generate
        for (gp = 0; gp < PIX; gp = gp + 1) begin : g_pix
            for (gr = 0; gr < RED; gr = gr + 1) begin : g_red
                booth4_mul u_mul (.a(act[(gp*RED + gr)*8 +: 8]), .act_signed(act_signed),
                                  .w(wcode[gr*4 +: 4]), .p(prod[(gp*RED + gr)*13 +: 13]));
            end
        end
    endgenerate

    localparam SUMW = 13 + $clog2(RED + 1);   // adder tree at the width the sum needs
    integer i, j;
    reg signed [SUMW-1:0] sum;
    always @(posedge clk) begin
        if (en) begin
            for (i = 0; i < PIX; i = i + 1) begin
                sum = 0;
                for (j = 0; j < RED; j = j + 1)
                    sum = sum + $signed(prod[(i*RED + j)*13 +: 13]);
                acc[i*ACCW +: ACCW] <= (clear ? bias : acc[i*ACCW +: ACCW]) + {{(ACCW-SUMW){sum[SUMW-1]}}, sum};
            end
        end
    end
endmodule
