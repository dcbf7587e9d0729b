//go:build linux
// +build linux

/*
Copyright 2026 The Kubernetes Authors.

Licensed under the Apache License, Version 2.0 (the "License");
you may not use this file except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.
*/

package conntrack

// This file encodes and decodes, with the standard library only, the two
// ctnetlink messages the UDP cleanup needs and that vishvananda/netlink does
// not offer: a dump request carrying a CTA_FILTER (Linux >= 5.8), so that only
// entries to one service frontend cross into userspace instead of the whole
// table (kubernetes/kubernetes#129982), and a delete of one entry by its
// original tuple (ctdelete.go), many of which share one sendmsg
// (kubernetes/kubernetes#135323). Nothing here does I/O; nlsock_linux.go owns
// the socket.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"syscall"
)

// Netlink and ctnetlink constants, from include/uapi/linux/netfilter/nfnetlink*.h
// and net/netfilter/nf_internals.h (CTA_FILTER_F_*).
const (
	nfnlSubsysCTNetlink = 1
	ipctnlMsgCtNew      = 0
	ipctnlMsgCtGet      = 1
	ipctnlMsgCtDelete   = 2

	ctaTupleOrig  = 1
	ctaTupleReply = 2
	ctaFilter     = 25

	ctaTupleIP    = 1
	ctaTupleProto = 2

	ctaIPv4Src = 1
	ctaIPv4Dst = 2
	ctaIPv6Src = 3
	ctaIPv6Dst = 4

	ctaProtoNum     = 1
	ctaProtoSrcPort = 2
	ctaProtoDstPort = 3

	ctaFilterOrigFlags  = 1
	ctaFilterReplyFlags = 2

	ctaFilterFlagIPDst     = 1 << 1
	ctaFilterFlagProtoNum  = 1 << 3
	ctaFilterFlagProtoDst  = 1 << 5
	nlaFNested             = 0x8000
	nlmsgHdrLen            = 16
	nfgenHdrLen            = 4
	nlmFlagDumpInterrupted = 0x10
)

// errDumpInterrupted reports a dump the kernel marked NLM_F_DUMP_INTR: the
// table changed underneath it, so the result may be partial and the caller
// retries (upstream retries EINTR the same way, pkg/proxy/util.MaxAttemptsEINTR).
var errDumpInterrupted = errors.New("conntrack dump interrupted")

// Tuple is one direction of a conntrack entry.
type Tuple struct {
	Src, Dst         netip.Addr
	SrcPort, DstPort uint16
}

// Flow is a conntrack entry as the UDP cleanup sees it: protocol and the
// original and reply tuples. Zones are not decoded; kube-proxy does not use them.
type Flow struct {
	Proto uint8
	Orig  Tuple
	Reply Tuple
}

// DumpFilter selects entries in the kernel. Proto is required; OrigDst and
// OrigDstPort are optional (zero value: any).
type DumpFilter struct {
	Family      uint8
	Proto       uint8
	OrigDst     netip.Addr
	OrigDstPort uint16
}

func appendAttr(b []byte, typ uint16, payload []byte) []byte {
	l := 4 + len(payload)
	b = binary.NativeEndian.AppendUint16(b, uint16(l))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, payload...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func appendNested(b []byte, typ uint16, inner []byte) []byte {
	return appendAttr(b, typ|nlaFNested, inner)
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }

func ipAttrs(family uint8, src, dst netip.Addr) ([]byte, error) {
	var b []byte
	srcType, dstType := uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
	if family == syscall.AF_INET6 {
		srcType, dstType = ctaIPv6Src, ctaIPv6Dst
	}
	for _, a := range []struct {
		typ  uint16
		addr netip.Addr
	}{{srcType, src}, {dstType, dst}} {
		if !a.addr.IsValid() {
			continue
		}
		if (family == syscall.AF_INET) != a.addr.Unmap().Is4() {
			return nil, fmt.Errorf("address %s does not belong to family %d", a.addr, family)
		}
		if family == syscall.AF_INET {
			v := a.addr.Unmap().As4()
			b = appendAttr(b, a.typ, v[:])
		} else {
			v := a.addr.As16()
			b = appendAttr(b, a.typ, v[:])
		}
	}
	return b, nil
}

func appendHeader(b []byte, msgType, flags uint16, seq uint32, family uint8) []byte {
	b = binary.NativeEndian.AppendUint32(b, 0) // length, patched by finish
	b = binary.NativeEndian.AppendUint16(b, nfnlSubsysCTNetlink<<8|msgType)
	b = binary.NativeEndian.AppendUint16(b, flags)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 0) // port id: the kernel
	return append(b, family, 0, 0, 0)          // nfgenmsg: family, NFNETLINK_V0, res_id
}

func finish(b []byte, start int) []byte {
	binary.NativeEndian.PutUint32(b[start:], uint32(len(b)-start))
	return b
}

// encodeDumpRequest returns an IPCTNL_MSG_CT_GET dump request whose CTA_FILTER
// makes the kernel return only entries of f.Proto (and, when set, to f.OrigDst
// and/or f.OrigDstPort in the original direction).
func encodeDumpRequest(seq uint32, f DumpFilter) ([]byte, error) {
	if f.Family != syscall.AF_INET && f.Family != syscall.AF_INET6 {
		return nil, fmt.Errorf("unsupported family %d", f.Family)
	}
	if f.Proto == 0 {
		return nil, errors.New("a filtered dump needs a protocol")
	}
	flags := uint32(ctaFilterFlagProtoNum)
	ip, err := ipAttrs(f.Family, netip.Addr{}, f.OrigDst)
	if err != nil {
		return nil, err
	}
	if f.OrigDst.IsValid() {
		flags |= ctaFilterFlagIPDst
	}
	proto := appendAttr(nil, ctaProtoNum, []byte{f.Proto})
	if f.OrigDstPort != 0 {
		proto = appendAttr(proto, ctaProtoDstPort, be16(f.OrigDstPort))
		flags |= ctaFilterFlagProtoDst
	}
	var tuple []byte
	if len(ip) > 0 {
		tuple = appendNested(tuple, ctaTupleIP, ip)
	}
	tuple = appendNested(tuple, ctaTupleProto, proto)
	filter := appendAttr(nil, ctaFilterOrigFlags, binary.NativeEndian.AppendUint32(nil, flags))
	filter = appendAttr(filter, ctaFilterReplyFlags, binary.NativeEndian.AppendUint32(nil, 0))

	b := appendHeader(nil, ipctnlMsgCtGet, syscall.NLM_F_REQUEST|syscall.NLM_F_DUMP, seq, f.Family)
	b = appendNested(b, ctaTupleOrig, tuple)
	b = appendNested(b, ctaFilter, filter)
	return finish(b, 0), nil
}

type attr struct {
	typ  uint16
	data []byte
}

func parseAttrs(b []byte) ([]attr, error) {
	var out []attr
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b))
		if l < 4 || l > len(b) {
			return nil, fmt.Errorf("malformed attribute length %d", l)
		}
		out = append(out, attr{typ: binary.NativeEndian.Uint16(b[2:]) &^ nlaFNested, data: b[4:l]})
		adv := (l + 3) &^ 3
		if adv > len(b) {
			adv = len(b)
		}
		b = b[adv:]
	}
	return out, nil
}

func parseTuple(b []byte) (uint8, Tuple, error) {
	var t Tuple
	var proto uint8
	top, err := parseAttrs(b)
	if err != nil {
		return 0, t, err
	}
	for _, a := range top {
		inner, err := parseAttrs(a.data)
		if err != nil {
			return 0, t, err
		}
		for _, ia := range inner {
			switch {
			case a.typ == ctaTupleIP && (ia.typ == ctaIPv4Src || ia.typ == ctaIPv6Src):
				t.Src, _ = netip.AddrFromSlice(ia.data)
			case a.typ == ctaTupleIP && (ia.typ == ctaIPv4Dst || ia.typ == ctaIPv6Dst):
				t.Dst, _ = netip.AddrFromSlice(ia.data)
			case a.typ == ctaTupleProto && ia.typ == ctaProtoNum && len(ia.data) >= 1:
				proto = ia.data[0]
			case a.typ == ctaTupleProto && ia.typ == ctaProtoSrcPort && len(ia.data) >= 2:
				t.SrcPort = binary.BigEndian.Uint16(ia.data)
			case a.typ == ctaTupleProto && ia.typ == ctaProtoDstPort && len(ia.data) >= 2:
				t.DstPort = binary.BigEndian.Uint16(ia.data)
			}
		}
	}
	return proto, t, nil
}

// nlMessage is one netlink message of a reply buffer.
type nlMessage struct {
	typ, flags uint16
	seq        uint32
	payload    []byte
}

func splitMessages(b []byte) ([]nlMessage, error) {
	var out []nlMessage
	for len(b) >= nlmsgHdrLen {
		l := int(binary.NativeEndian.Uint32(b))
		if l < nlmsgHdrLen || l > len(b) {
			return nil, fmt.Errorf("malformed netlink message length %d", l)
		}
		out = append(out, nlMessage{
			typ:     binary.NativeEndian.Uint16(b[4:]),
			flags:   binary.NativeEndian.Uint16(b[6:]),
			seq:     binary.NativeEndian.Uint32(b[8:]),
			payload: b[nlmsgHdrLen:l],
		})
		adv := (l + 3) &^ 3
		if adv > len(b) {
			adv = len(b)
		}
		b = b[adv:]
	}
	return out, nil
}

// errnoOf returns the errno an NLMSG_ERROR message carries (0 for an ACK).
func errnoOf(m nlMessage) syscall.Errno {
	if len(m.payload) < 4 {
		return syscall.EINVAL
	}
	return syscall.Errno(-int32(binary.NativeEndian.Uint32(m.payload)))
}

// decodeDumpBuffer calls visit for each flow in one buffer of dump replies and
// reports whether the dump is complete (NLMSG_DONE seen).
func decodeDumpBuffer(b []byte, visit func(Flow)) (done bool, err error) {
	msgs, err := splitMessages(b)
	if err != nil {
		return false, err
	}
	for _, m := range msgs {
		switch m.typ {
		case syscall.NLMSG_DONE:
			if m.flags&nlmFlagDumpInterrupted != 0 {
				err = errDumpInterrupted
			}
			return true, err
		case syscall.NLMSG_ERROR:
			if e := errnoOf(m); e != 0 {
				return true, e
			}
			continue
		case nfnlSubsysCTNetlink<<8 | ipctnlMsgCtNew:
		default:
			continue
		}
		if m.flags&nlmFlagDumpInterrupted != 0 {
			err = errDumpInterrupted
		}
		if len(m.payload) < nfgenHdrLen {
			return false, errors.New("short ctnetlink message")
		}
		attrs, perr := parseAttrs(m.payload[nfgenHdrLen:])
		if perr != nil {
			return false, perr
		}
		var fl Flow
		for _, a := range attrs {
			switch a.typ {
			case ctaTupleOrig:
				p, t, terr := parseTuple(a.data)
				if terr != nil {
					return false, terr
				}
				fl.Proto, fl.Orig = p, t
			case ctaTupleReply:
				_, t, terr := parseTuple(a.data)
				if terr != nil {
					return false, terr
				}
				fl.Reply = t
			}
		}
		visit(fl)
	}
	return false, err
}
